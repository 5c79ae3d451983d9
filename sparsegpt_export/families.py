"""Which model families sparsegpt-export compresses, and the one-line reason for those it refuses.

Checked before any work: on the config (``check_config``, before the weights are read) and on the built model
(``check_supported``: encoder-decoder, a refused model type, no linear layer or fused expert matrix in its blocks).
Every refusal is an `UnsupportedModelError` whose message names the model type and the reason.
"""
from __future__ import annotations

import inspect
from typing import Any, Optional

from torch import nn

from .anatomy import UnsupportedModelError  # noqa: F401  (re-exported: refusals are raised from here)
from .moe import fused_experts


_SSM = ("its blocks are pure state-space layers (selective scan) with no attention or MLP; sparsegpt-export "
        "compresses transformer decoder blocks (hybrids with attention layers are supported)")
_ASSISTANT = ("an assistant (draft) model for speculative decoding: its layers attend only to the key/value states "
              "its target model shares with it, so it cannot run on calibration text alone; compress the target model")
_RECURRENT = ("its blocks are pure recurrent layers with no attention or MLP; sparsegpt-export compresses transformer "
              "decoder blocks")

# model_type -> why it is refused (one line each)
REFUSED: dict[str, str] = {
    "mamba": _SSM,
    "mamba2": _SSM,
    "falcon_mamba": _SSM,
    "rwkv": _RECURRENT,
    "xlstm": _RECURRENT,
    "gemma4_assistant": _ASSISTANT,
    "gemma4_unified_assistant": _ASSISTANT,
    "reformer": ("reversible layers that carry two hidden-state streams between blocks; sparsegpt-export walks blocks "
                 "that pass one hidden state"),
}


def model_type(config: Any) -> str:
    return str(getattr(config, "model_type", "") or type(config).__name__)


def refusal(config: Any) -> Optional[str]:
    """The reason ``config``'s model is refused, or None."""
    mt = model_type(config)
    if mt in REFUSED:
        return REFUSED[mt]
    if getattr(config, "is_encoder_decoder", False):
        return ("encoder-decoder model; sparsegpt-export compresses decoder-only causal LMs (Llama, Mistral, Qwen, "
                "Gemma, Phi, OPT, GPT-2, GPT-NeoX, Falcon, Mixtral, ...)")
    return None


def check_config(config: Any, class_name: Optional[str] = None) -> None:
    """An `UnsupportedModelError` naming the model type (and class) and why, when ``config`` is refused."""
    why = refusal(config)
    if why is not None:
        cls = class_name or next(iter(getattr(config, "architectures", None) or []), None)
        raise UnsupportedModelError(f"model type {model_type(config)!r}{f' ({cls})' if cls else ''}: {why}")


def check_supported(model: nn.Module) -> None:
    """Refuse ``model`` (before any work) when its config is refused."""
    cfg = getattr(model, "config", None)
    if cfg is not None:
        check_config(cfg, type(model).__name__)


def check_blocks(model: nn.Module, blocks: nn.ModuleList) -> None:
    """Refuse a model whose blocks hold no linear layer and no fused expert matrix: nothing to compress."""
    for block in blocks:
        for mod in block.modules():
            if isinstance(mod, nn.Linear) or type(mod).__name__ == "Conv1D":
                return
        if fused_experts(block):
            return
    cfg = getattr(model, "config", None)
    mt = f"model type {model_type(cfg)!r} ({type(model).__name__})" if cfg is not None else type(model).__name__
    raise UnsupportedModelError(f"{mt}: its blocks hold no linear layer (nn.Linear) and no fused expert matrix to "
                                "compress")


def check_checkpoint(name_or_path: str) -> None:
    """`check_config` on a checkpoint's config.json, before its weights are loaded (no-op when it cannot be read:
    the loader then says why)."""
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError, KeyError):
        return
    check_config(cfg)


def block_inputs(block: nn.Module, args: tuple, kwargs: dict) -> tuple[Any, dict]:
    """A block call as (hidden states, keyword arguments): positional arguments after the hidden states (CPM-Ant's
    attention mask, ...) become keywords by the block's forward signature, so the block can be called again."""
    kwargs = dict(kwargs)
    try:  # the class's forward: an instance may have its forward replaced (capture.per_block_kwargs)
        sig = inspect.signature(type(block).forward)
        bound = sig.bind_partial(block, *args, **kwargs)
    except (TypeError, ValueError):
        return (args[0] if args else kwargs.pop("hidden_states")), kwargs
    params = dict(list(sig.parameters.items())[1:])  # without self
    bound.arguments.pop(next(iter(sig.parameters)))
    if not args or any(params[n].kind == inspect.Parameter.VAR_POSITIONAL for n in bound.arguments):
        return (args[0] if args else kwargs.pop("hidden_states")), kwargs
    named = dict(bound.arguments)
    hs = named.pop(next(iter(params)))
    out: dict = {}
    for name, value in named.items():
        if params[name].kind == inspect.Parameter.VAR_KEYWORD:
            out.update(value)
        else:
            out[name] = value
    return hs, out


def note_unreached(todo: dict[str, nn.Module], records: dict, rows: list[dict]) -> list[str]:
    """Layers of ``todo`` that the block's forward never called on the calibration data (a decoder's cross-attention
    without encoder states, ...): left dense, each with a report row and warning, never silently. Returns them."""
    done = set(records) | {r.get("layer") for r in rows}
    missed = [n for n in todo if n not in done]
    for name in missed:
        w = todo[name].weight
        msg = (f"layer {name}: never called in the block's forward on the calibration data (e.g. cross-attention "
               "without encoder states); left dense")
        rows.append({"layer": name, "pattern": "skipped", "warning": msg, "shape": list(w.shape)})
    return missed
