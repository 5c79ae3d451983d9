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
from .capture import CACHE_KWARGS, move_back, move_outside_blocks


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


class _KwargsRecorder:
    """A forward pre-hook for every block: each block's keyword arguments go into ``row`` (one chunk's); the last
    block stops the forward."""

    def __init__(self, blocks: nn.ModuleList):
        self.last = blocks[len(blocks) - 1]
        self.row: list[dict] = []
        self.handles = [b.register_forward_pre_hook(self.hook, with_kwargs=True) for b in blocks]

    def hook(self, block: nn.Module, args: tuple, kwargs: dict) -> None:
        _, kw = block_inputs(block, args, kwargs)
        self.row.append({k: v for k, v in kw.items() if k not in CACHE_KWARGS})
        if block is self.last:
            raise _Stop

    def chunk(self, model: nn.Module, ids: torch.Tensor) -> Optional[list[dict]]:
        """One chunk's forward: every block's keyword arguments, or None when the last block was never called."""
        self.row = []
        try:
            model(input_ids=ids, use_cache=False)
        except _Stop:
            return self.row
        return None

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


@torch.no_grad()
def per_block_kwargs(model: nn.Module, blocks: nn.ModuleList, calib: torch.Tensor, batch: int,
                     device: torch.device) -> Optional[list[list[dict]]]:
    """Every block's keyword arguments per chunk of ``batch`` windows, or None when the model does not need them
    (or its forward does not run with identity blocks: the first block's arguments are then used for all)."""
    if not needs_per_block_kwargs(model):
        return None
    out: Optional[list[list[dict]]] = []
    recorder = _KwargsRecorder(blocks)
    moved = move_outside_blocks(model, blocks, device)
    try:
        for identity in (_identity, _identity_pair):
            for b in blocks:
                b.forward = identity
            out = []
            for i in range(0, calib.shape[0], batch):
                try:
                    row = recorder.chunk(model, calib[i:i + batch].to(device))
                except Exception:  # noqa: BLE001  (the model's loop wants another block output: the next identity)
                    out = None
                    break
                if row is None:
                    return None  # the last block was never called
                out.append(row)
            if out is not None:
                break
    finally:
        for b in blocks:
            b.__dict__.pop("forward", None)
        recorder.remove()
        move_back(moved)
    return out if out and all(len(r) == len(blocks) for r in out) else None  # None: keep the first block's
