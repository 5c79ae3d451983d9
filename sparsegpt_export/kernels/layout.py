"""The runtime layout of a 2:4 layer on the device, repacked once at load from the ``sparse24`` file, and a
pure-torch reference of what the kernels compute.

Layout (``N`` = out features, ``K`` = in features, ``K % 4 == 0``; input group ``g`` = inputs ``4g .. 4g+3``):

- ``positions`` uint8 [N, ceil(K/8)]: one nibble per input group, two groups a byte (group ``2j`` in the low
  nibble of byte ``j``); in a nibble, bits 0-1 are the slot (0..3) of the group's first kept weight, bits 2-3
  the slot of its second, ascending. This is the file's own ``.positions`` bit stream (2-bit fields, little
  endian per row), so an int4 layer is used as stored;
- int4 2:4 (``kind = "int4_24"``): ``codes`` uint8 [N, K/4], byte ``g`` of a row = group ``g``'s two 4-bit codes
  (the first kept weight in the low nibble), the file's ``.codes``; ``scales`` [N, ceil(K/group_size)] as stored
  (float16); ``zeros`` uint8 [N, ngroups] for asymmetric grids (symmetric: zero point 8). A weight is
  ``scale * (code - zero)``; ``group_size`` is a multiple of 4 (a group of 4 inputs never straddles two scales);
  the last group may be shorter (ragged) and per-channel is ``group_size = K``;
- fp16/bf16 2:4 (``kind = "fp16_24"``): ``values`` [N, K/2] in the model dtype, the two kept weights of every
  group in slot order, with ``positions`` as above. A file in the CUTLASS layout (``.values`` [N, K/2] +
  ``.meta`` int16 interleaved for CUTLASS) is decoded once on the CPU and repacked into this layout.

A kernel thus reads 0.25 (codes) + 0.125 (positions) + 2/group_size (scales) bytes per weight for int4 2:4
(0.39 at group 128, 0.195x the fp16 bytes) and 1.125 for fp16 2:4; every weight is rebuilt in registers.
"""
from __future__ import annotations

from typing import Optional

import torch

INT4 = "int4_24"
FP16 = "fp16_24"


def pack_positions(pos: torch.Tensor) -> torch.Tensor:
    """[N, G, 2] slot indices (ascending, < 4) -> positions uint8 [N, ceil(G/2)] (the layout above)."""
    n, g, _ = pos.shape
    nib = (pos[..., 0] | (pos[..., 1] << 2)).to(torch.int32)
    if g % 2:
        nib = torch.cat([nib, nib.new_zeros(n, 1)], dim=1)
    nib = nib.reshape(n, -1, 2)
    return (nib[..., 0] | (nib[..., 1] << 4)).to(torch.uint8)


def unpack_positions(positions: torch.Tensor, groups: int) -> torch.Tensor:
    """positions uint8 [N, ceil(G/2)] -> [N, G, 2] int64 slot indices."""
    b = positions.to(torch.int64)
    nib = torch.stack([b & 15, b >> 4], dim=-1).reshape(b.shape[0], -1)[:, :groups]
    return torch.stack([nib & 3, (nib >> 2) & 3], dim=-1)


def pack_24(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A dense 2:4 weight [N, K] -> (values [N, K/2], positions): the nonzeros of each group of 4, then its
    first free slots, ascending. ValueError when a group holds more than 2 nonzeros."""
    n, k = w.shape
    if k % 4:
        raise ValueError(f"{k} input features are not a multiple of 4")
    g = w.reshape(n, k // 4, 4)
    nz = g != 0
    if bool((nz.sum(-1) > 2).any()):
        raise ValueError("the weight is not 2:4 (a group of 4 holds more than 2 nonzeros)")
    key = (~nz).to(torch.int64) * 4 + torch.arange(4, device=w.device)
    pos = key.argsort(dim=-1)[..., :2].sort(dim=-1).values
    return g.gather(-1, pos).reshape(n, k // 2).contiguous(), pack_positions(pos)


def dense_from_layout(kind: str, tensors: dict[str, torch.Tensor], in_features: int, group_size: Optional[int],
                      dtype: torch.dtype) -> torch.Tensor:
    """The reference: the dense weight [N, K] in ``dtype`` that the kernels multiply by (any device)."""
    pos = unpack_positions(tensors["positions"], in_features // 4)
    n = pos.shape[0]
    if kind == INT4:
        c = tensors["codes"].to(torch.int64)
        vals = torch.stack([c & 15, c >> 4], dim=-1).float()  # [N, G, 2]
        gs = group_size or in_features
        idx = (torch.arange(in_features // 4, device=c.device) * 4) // gs
        s = tensors["scales"].float()[:, idx]
        z = tensors["zeros"].float()[:, idx] if tensors.get("zeros") is not None else 8.0
        vals = (vals - (z[..., None] if torch.is_tensor(z) else z)) * s[..., None]
    else:
        vals = tensors["values"].reshape(n, -1, 2).float()
    w = torch.zeros(n, in_features // 4, 4, dtype=torch.float32, device=pos.device)
    w.scatter_(-1, pos, vals)
    return w.reshape(n, in_features).to(dtype)
