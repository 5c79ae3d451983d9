"""`Sparse24Linear`: a linear layer whose 2:4 weight stays packed on the device (int4 codes or fp16/bf16 values
with 2-bit positions, `layout`), run by the kernels of `ops` through a per-M dispatch table; or, where the
kernels do not apply (CPU, no triton, a GPU older than sm80, other patterns or shapes), a dense weight.

The dispatch table lists ``(max_m, variant)`` in increasing ``max_m``: a call with M rows (all leading dimensions
of the input flattened) takes the first entry with ``M <= max_m``. It comes from `DEFAULT_DISPATCH`, or is
measured once at load (`tune`) against dense ``F.linear`` on the decoded weight.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import layout, ops

UNBOUNDED = 1 << 62
DEFAULT_DISPATCH = ((16, "gemv"), (256, "tiled"), (UNBOUNDED, "decode"))
DENSE = "dense"


class Sparse24Linear(nn.Module):
    """``y = x W^T + b`` for any input shape and stride, any batch; ``kind`` is ``"int4_24"``, ``"fp16_24"`` or
    ``"dense"`` (``tensors``: the runtime layout of `layout`, or ``{"weight": W}``)."""

    def __init__(self, in_features: int, out_features: int, kind: str, tensors: dict[str, Optional[torch.Tensor]],
                 group_size: Optional[int] = None, bias: Optional[torch.Tensor] = None,
                 dispatch: tuple = DEFAULT_DISPATCH):
        super().__init__()
        if kind not in (layout.INT4, layout.FP16, DENSE):
            raise ValueError(f"Sparse24Linear: unknown kind {kind!r}")
        self.in_features, self.out_features, self.kind = in_features, out_features, kind
        self.group_size = int(group_size or in_features)
        if kind == DENSE:
            self.weight = nn.Parameter(tensors["weight"], requires_grad=False)
        else:
            for name, t in tensors.items():
                self.register_buffer(name, t)
            if kind == layout.INT4 and "zeros" not in tensors:
                self.register_buffer("zeros", None)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.set_dispatch(dispatch)

    def set_dispatch(self, dispatch) -> None:
        table = tuple((int(m), str(v)) for m, v in dispatch)
        if not table or any(v not in ops.VARIANTS for _, v in table) or list(table) != sorted(table):
            raise ValueError(f"Sparse24Linear: bad dispatch table {dispatch!r}")
        self.dispatch = table[:-1] + ((UNBOUNDED, table[-1][1]),)

    def variant_for(self, m: int) -> str:
        for max_m, variant in self.dispatch:
            if m <= max_m:
                return variant
        return self.dispatch[-1][1]

    def matmul(self, x2: torch.Tensor, variant: str) -> torch.Tensor:
        """[M, K] contiguous -> [M, N] without the bias, by ``variant``."""
        if self.kind == layout.INT4:
            return torch.ops.sparsegpt.int4_24_mm(x2, self.codes, self.positions, self.scales, self.zeros,
                                                  self.group_size, variant)
        return torch.ops.sparsegpt.fp16_24_mm(x2, self.values, self.positions, variant)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == DENSE:
            return F.linear(x, self.weight, self.bias)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).contiguous()
        if x2.shape[0] == 0:
            y = x2.new_zeros(0, self.out_features)
        else:
            y = self.matmul(x2, self.variant_for(x2.shape[0]))
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)

    def dense_weight(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The weight [N, K] this layer multiplies by (the pure-torch decode of its runtime layout)."""
        if self.kind == DENSE:
            return self.weight if dtype is None else self.weight.to(dtype)
        t = {k: getattr(self, k) for k in ("codes", "values", "positions", "scales", "zeros") if hasattr(self, k)}
        dt = dtype or (self.values.dtype if self.kind == layout.FP16 else self.scales.dtype)
        return layout.dense_from_layout(self.kind, t, self.in_features, self.group_size, dt)

    def dispatch_text(self) -> str:
        if self.kind == DENSE:
            return DENSE
        parts = [f"{v} M<={m}" for m, v in self.dispatch[:-1]]
        return ", ".join(parts + [f"{self.dispatch[-1][1]} above" if parts else self.dispatch[-1][1]])

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, kind={self.kind}, "
                f"bias={self.bias is not None}, dispatch=[{self.dispatch_text()}]")
