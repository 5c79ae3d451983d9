"""The calibration inputs of the first block, and which layers of a block read one and the same input."""
from __future__ import annotations

import torch
from torch import nn

from ..anatomy import UnsupportedModelError
from ..families import block_inputs

CACHE_KWARGS = ("past_key_value", "past_key_values", "cache", "layer_past")


class _StopForward(Exception):
    pass


@torch.no_grad()
def capture_block_inputs(model: nn.Module, blocks: nn.ModuleList, calib: torch.Tensor, batch: int, device: torch.device):
    """Run the model up to its first block for each chunk of windows: [(hidden_states, kwargs), ...]."""
    captured: list[tuple[torch.Tensor, dict]] = []

    def hook(_mod, args, kwargs):
        hs, kwargs = block_inputs(blocks[0], args, kwargs)
        captured.append((hs, {k: v for k, v in kwargs.items() if k not in CACHE_KWARGS}))
        raise _StopForward

    moved = move_outside_blocks(model, blocks, device)
    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for i in range(0, calib.shape[0], batch):
            try:
                model(input_ids=calib[i:i + batch].to(device), use_cache=False)
            except _StopForward:
                pass
            else:
                raise UnsupportedModelError(f"{type(model).__name__}: the forward never reached the first block")
    finally:
        handle.remove()
        move_back(moved)
    return captured


def move_outside_blocks(model: nn.Module, blocks: nn.ModuleList, device: torch.device) -> list:
    """Move everything but the blocks (embeddings, rotary tables) to ``device``; returns what `move_back` restores."""
    inside = {id(p) for p in blocks.parameters()} | {id(b) for b in blocks.buffers()}
    moved = []
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in inside and t.device != device and t.device.type != "meta":
            moved.append((t, t.device))
            t.data = t.data.to(device)
    return moved


def move_back(moved: list) -> None:
    for t, dev in moved:
        t.data = t.data.to(dev)


def _cut(v, b: int):
    """Keyword values whose first dimension is the batch, cut to the first window."""
    if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == b and b > 1:
        return v[:1]
    if isinstance(v, tuple):
        return tuple(_cut(t, b) for t in v)
    return v


def shared_input_groups(block: nn.Module, chunk, todo: dict[str, nn.Module]) -> list[list[str]]:
    """The layers of ``todo`` that read one and the same input tensor (q/k/v, gate/up), in call order, from a
    forward of the block on the first window of ``chunk`` (the weights are not touched). Layers that share
    nothing form groups of one."""
    seen: list[tuple[str, tuple]] = []
    alive: list[torch.Tensor] = []  # inputs held for the forward: no later tensor can reuse their address
    handles = [mod.register_forward_pre_hook(
        lambda _m, args, name=name: (seen.append((name, (args[0].data_ptr(), tuple(args[0].shape)))),
                                     alive.append(args[0]))[0] and None)
        for name, mod in todo.items()]
    hs, kw = chunk
    try:
        with torch.no_grad():
            try:
                block(hs[:1], **{k: _cut(v, hs.shape[0]) for k, v in kw.items()})
            except RuntimeError:  # keyword tensors that do not lead with the batch (ALiBi: batch x heads): all of it
                seen.clear()
                alive.clear()
                block(hs, **kw)
    finally:
        for h in handles:
            h.remove()
    groups: list[list[str]] = []
    last = None
    for name, key in seen:
        if groups and key == last and name not in groups[-1]:
            groups[-1].append(name)
        elif not any(name in g for g in groups):
            groups.append([name])
        last = key
    return groups
