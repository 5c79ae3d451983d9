"""Uniform integer weight grids: per-row (and per-group) scales and zero points.

Conventions, shared by the solver and every converter:
- codes are integers in ``[0, 2^bits - 1]``; the value of a code is ``scale * (code - zero)``;
- symmetric grids use the fixed zero point ``2^(bits-1)`` (4 bits: values ``-8s .. 7s``), which is the
  signed int4 of compressed-tensors and the ``zero_point = 8`` default of ONNX ``MatMulNBits``;
- scales are rounded to their storage dtype (float16 by default) when they are chosen, so that every export
  reproduces the compressed weights bit for bit and nothing is rounded twice;
- a pruned weight has the code ``zero`` and the value exactly 0.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class QuantSpec:
    bits: int
    group_size: Optional[int] = None  # None: one group per row
    sym: bool = True
    scale_dtype: torch.dtype = torch.float16
    clip_search: bool = True

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    def ngroups(self, cols: int) -> int:
        g = self.group_size or cols
        return (cols + g - 1) // g


_SHRINK_GRID = torch.linspace(1.0, 0.55, 10).tolist()


def _params_from_range(xmin: torch.Tensor, xmax: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point for ranges ``[xmin, xmax]`` (any shape), scales rounded to ``spec.scale_dtype``."""
    maxq = spec.maxq
    xmin = torch.minimum(xmin, torch.zeros_like(xmin))
    xmax = torch.maximum(xmax, torch.zeros_like(xmax))
    if spec.sym:
        amax = torch.maximum(xmax, -xmin)
        # codes 0..maxq around zero = 2^(b-1): the negative side has one more step than the positive one
        scale = amax / ((maxq + 1) / 2)
        # keep the largest positive value representable when it dominates
        scale = torch.where(xmax >= -xmin, torch.maximum(scale, xmax / ((maxq - 1) / 2)), scale)
    else:
        scale = (xmax - xmin) / maxq
    tiny = torch.finfo(spec.scale_dtype).tiny
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    scale = scale.clamp(min=tiny).to(spec.scale_dtype).to(torch.float32)
    if spec.sym:
        zero = torch.full_like(scale, float((maxq + 1) // 2))
    else:
        zero = torch.round(-xmin / scale).clamp(0, maxq)
    return scale, zero


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Dequantized values of ``w`` on the grid (broadcasting scale/zero)."""
    q = torch.clamp(torch.round(w / scale) + zero, 0, maxq)
    return scale * (q - zero)


def codes_of(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    return torch.clamp(torch.round(w / scale) + zero, 0, maxq)


def fit_params(
    w: torch.Tensor,
    spec: QuantSpec,
    keep: Optional[torch.Tensor] = None,
    col_weight: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row scale/zero for the columns of ``w`` [rows, cols] (one group).

    Only the weights in ``keep`` (bool, same shape) are fitted: pruned weights are exactly 0 whatever the grid,
    so they should not widen the range. With ``clip_search`` the range is shrunk by the factor that minimises
    the squared quantization error of the kept weights (a small grid search per row), each column's error
    weighted by ``col_weight`` [cols] when given (the solver passes the OBS cost ``1 / [U]_jj^2``).
    Returns ``scale, zero`` of shape [rows, 1].
    """
    w = w.float()
    if keep is not None:
        big = torch.finfo(torch.float32).max
        xmin = torch.where(keep, w, torch.full_like(w, big)).amin(dim=1, keepdim=True)
        xmax = torch.where(keep, w, torch.full_like(w, -big)).amax(dim=1, keepdim=True)
        none_kept = ~keep.any(dim=1, keepdim=True)
        xmin = torch.where(none_kept, torch.zeros_like(xmin), xmin)
        xmax = torch.where(none_kept, torch.zeros_like(xmax), xmax)
        weight = keep.float()
    else:
        xmin = w.amin(dim=1, keepdim=True)
        xmax = w.amax(dim=1, keepdim=True)
        weight = None
    if not spec.clip_search:
        return _params_from_range(xmin, xmax, spec)
    shrink = torch.tensor(_SHRINK_GRID, dtype=torch.float32, device=w.device).view(-1, 1, 1)
    scale, zero = _params_from_range(xmin.unsqueeze(0) * shrink, xmax.unsqueeze(0) * shrink, spec)  # [P, rows, 1]
    if col_weight is not None:
        cw = col_weight.to(torch.float32).reshape(1, -1)
        weight = cw if weight is None else weight * cw  # keep is 0/1: the same products as two multiplications
    sums = torch.empty(len(_SHRINK_GRID), w.shape[0], dtype=torch.float32, device=w.device)
    for p in range(len(_SHRINK_GRID)):  # one shrink factor at a time: [rows, cols] temporaries, not [P, rows, cols]
        s, z = scale[p], zero[p]
        e = torch.div(w, s).round_().clamp_(-z, spec.maxq - z).mul_(s).sub_(w)  # = quantize(w, s, z) - w
        e.mul_(e)
        if weight is not None:
            e.mul_(weight)
        torch.sum(e, dim=1, out=sums[p])
    best = sums.argmin(dim=0)  # [rows]
    rows = torch.arange(w.shape[0], device=w.device)
    return scale[best, rows], zero[best, rows]
