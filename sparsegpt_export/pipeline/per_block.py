"""Keyword arguments that differ from block to block (hybrid and alternating-attention decoders).

The pipeline captures the first block's inputs and reuses its keyword arguments (masks, position embeddings) for every
block. Models whose layers are of several kinds (``config.layer_types``: sliding and full attention in Gemma 2/3/4,
gpt-oss, Cohere 2; linear and full attention in Qwen3-Next; per-layer head sizes in Gemma 4) hand each block the
mask and position embeddings of its kind. For them, one extra forward per chunk of windows records every block's
keyword arguments, with each block's forward replaced by the identity (the blocks do no work, their weights are not
read): ``per_block_kwargs(...)[chunk][block]``.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from ..families import block_inputs

DROPPED = ("past_key_value", "past_key_values", "cache", "layer_past")


class _Stop(Exception):
    pass


def needs_per_block_kwargs(model: nn.Module) -> bool:
    cfg = getattr(model, "config", None)
    if cfg is None:
        return False
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    kinds = getattr(text, "layer_types", None)
    heterogeneous = getattr(text, "is_heterogeneous", False) is True  # per-layer overrides (Gemma 4's head sizes)
    return (isinstance(kinds, (list, tuple)) and len(set(kinds)) > 1) or heterogeneous


def _identity(*args: Any, **kwargs: Any) -> Any:
    return args[0] if args else kwargs["hidden_states"]


def _identity_pair(*args: Any, **kwargs: Any) -> Any:
    """For decoders whose blocks return (hidden states, state for the next block), e.g. Kolibri's index pool."""
    return _identity(*args, **kwargs), None


@torch.no_grad()
def per_block_kwargs(model: nn.Module, blocks: nn.ModuleList, calib: torch.Tensor, batch: int,
                     device: torch.device) -> Optional[list[list[dict]]]:
    """Every block's keyword arguments per chunk of ``batch`` windows, or None when the model does not need them
    (or its forward does not run with identity blocks: the first block's arguments are then used for all)."""
    if not needs_per_block_kwargs(model):
        return None
    out: list[list[dict]] = []
    row: list[dict] = []

    def make_hook(i: int):
        def hook(block, args, kwargs):
            _, kw = block_inputs(block, args, kwargs)
            row.append({k: v for k, v in kw.items() if k not in DROPPED})
            if i == len(blocks) - 1:
                raise _Stop
        return hook

    handles = [b.register_forward_pre_hook(make_hook(i), with_kwargs=True) for i, b in enumerate(blocks)]
    moved = _to_device(model, blocks, device)
    try:
        for identity in (_identity, _identity_pair):
            for b in blocks:
                b.forward = identity
            out = []
            for i in range(0, calib.shape[0], batch):
                row = []
                try:
                    model(input_ids=calib[i:i + batch].to(device), use_cache=False)
                    return None  # the last block was never called
                except _Stop:
                    out.append(row)
                except Exception:  # noqa: BLE001  (the model's loop wants another block output: the next identity)
                    out = None
                    break
            if out is not None:
                break
    finally:
        for b in blocks:
            b.__dict__.pop("forward", None)
        for h in handles:
            h.remove()
        for t, dev in moved:
            t.data = t.data.to(dev)
    return out if out and all(len(r) == len(blocks) for r in out) else None  # None: keep the first block's


def _to_device(model: nn.Module, blocks: nn.ModuleList, device: torch.device) -> list:
    """Move everything but the blocks to ``device``; returns what to move back."""
    inside = {id(p) for p in blocks.parameters()} | {id(b) for b in blocks.buffers()}
    moved = []
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in inside and t.device != device and t.device.type != "meta":
            moved.append((t, t.device))
            t.data = t.data.to(device)
    return moved
