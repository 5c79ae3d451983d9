"""Where a Hugging Face decoder keeps what the pipeline compresses: its stack of blocks, their linear layers, the
final norm before the lm_head. The one place with architecture knowledge; nothing here runs a compression.
"""
from __future__ import annotations

import re
from typing import Any, Optional

import torch
from torch import nn


class UnsupportedModelError(ValueError):
    """The model's architecture has no stack of decoder blocks this package can find."""


# Where the decoder blocks live, for the architectures we know by name; anything else is found generically.
BLOCK_PATHS = (
    "model.layers",  # Llama, Mistral, Qwen2/3, Phi-3, Gemma, Granite, ...
    "model.decoder.layers",  # OPT
    "transformer.h",  # GPT-2, Falcon, GPT-J, BLOOM
    "gpt_neox.layers",  # GPT-NeoX / Pythia
    "model.language_model.layers",
)

# Parts of a composite model whose layer stacks are not the language model's blocks (skipped by block discovery).
NON_TEXT_PARTS = ("vision", "visual", "image", "audio", "speech")

# What sits between the last block and the lm_head: the final norm (and OPT's optional projection).
FINAL_NORM_PATHS = (
    "model.norm", "model.decoder.final_layer_norm", "transformer.ln_f", "gpt_neox.final_layer_norm",
    "model.final_layernorm", "model.language_model.norm",
)


def get_path(obj: Any, path: str) -> Any:
    """``obj.a.b.c`` for ``"a.b.c"``, or None where a part is missing."""
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def get_weight(module: nn.Module) -> torch.Tensor:
    """The weight as [out_features, in_features] (GPT-2's Conv1D stores it transposed)."""
    w = module.weight.data
    return w.t() if type(module).__name__ == "Conv1D" else w


def set_weight(module: nn.Module, w: torch.Tensor) -> None:
    if type(module).__name__ == "Conv1D":
        w = w.t()
    module.weight.data.copy_(w.to(module.weight.dtype))


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ModuleList of transformer blocks and its dotted path; a clear error naming the class otherwise."""
    cfg = getattr(model, "config", None)
    if cfg is not None and getattr(cfg, "is_encoder_decoder", False):
        raise UnsupportedModelError(
            f"{type(model).__name__}: encoder-decoder models are not supported; sparsegpt-export compresses "
            "decoder-only causal LMs (Llama, Mistral, Qwen, Phi, Gemma, OPT, GPT-2, GPT-NeoX, Falcon, ...)"
        )
    for path in BLOCK_PATHS:
        blocks = get_path(model, path)
        if isinstance(blocks, nn.ModuleList) and len(blocks) > 0:
            return path, blocks
    # generic: the longest ModuleList of identical modules that contain linear layers
    best: tuple[int, str, Optional[nn.ModuleList]] = (0, "", None)
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > best[0] and not any(w in name for w in NON_TEXT_PARTS):
            kinds = {type(m) for m in mod}
            if len(kinds) == 1 and any(is_linear(x) for x in mod[0].modules()):
                best = (len(mod), name, mod)
    if best[2] is None:
        raise UnsupportedModelError(
            f"{type(model).__name__}: no stack of transformer blocks with linear layers was found; "
            f"supported are decoder-only models whose blocks live in one of {list(BLOCK_PATHS)} or another "
            "ModuleList of identical blocks"
        )
    return best[1], best[2]


def block_linears(block: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in block.named_modules() if n and is_linear(m)}


def is_selected(name: str, targets: list[str], ignore: list[str]) -> bool:
    """Whether a layer name passes ``--targets`` (any matches, when given) and ``--ignore`` (none matches)."""
    if targets and not any(re.search(rx, name) for rx in targets):
        return False
    return not any(re.search(rx, name) for rx in ignore)


def selected_layers(path: str, blocks: nn.ModuleList, targets: list[str], ignore: list[str]) -> dict[str, nn.Module]:
    """Every linear layer the run compresses, by its full name, in block order."""
    return {f"{path}.{bi}.{k}": v for bi, block in enumerate(blocks) for k, v in block_linears(block).items()
            if is_selected(f"{path}.{bi}.{k}", targets, ignore)}


def first_hidden(out: Any) -> torch.Tensor:
    """A block's output hidden states, whatever container the block returns them in."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return out[0]
    if hasattr(out, "hidden_states"):
        return out.hidden_states
    raise TypeError(f"unexpected block output type {type(out).__name__}")


def final_norm(model: nn.Module) -> tuple[nn.Module, list[nn.Module]]:
    """The final norm before the lm_head, and everything applied between the last block and the lm_head (the norm,
    and OPT's optional ``project_out``), in order."""
    norm = next((m for m in (get_path(model, p) for p in FINAL_NORM_PATHS) if isinstance(m, nn.Module)), None)
    if norm is None:
        raise UnsupportedModelError(
            f"{type(model).__name__}: --quantize-lm-head: cannot find the final norm before the lm_head "
            f"(looked for {list(FINAL_NORM_PATHS)})"
        )
    return norm, [norm] + [m for m in [get_path(model, "model.decoder.project_out")] if isinstance(m, nn.Module)]


def untie_lm_head(model: nn.Module) -> bool:
    """Give the lm_head its own weight when it shares the embedding's; True when it was tied."""
    lm, emb = model.get_output_embeddings(), model.get_input_embeddings()
    if lm is None or emb is None or lm.weight.data_ptr() != emb.weight.data_ptr():
        return False
    lm.weight = nn.Parameter(lm.weight.detach().clone(), requires_grad=False)
    for cfg in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        cfg.tie_word_embeddings = False
    return True
