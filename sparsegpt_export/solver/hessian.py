"""The layer Hessian ``H = 2/n X^T X`` of a linear layer's calibration inputs, streamed."""
from __future__ import annotations

import torch

from .errors import SolverError


class HessianAccumulator:
    """Running mean of ``2 X^T X`` over calibration batches.

    ``add(x)`` takes inputs of shape [..., cols]; the mean is kept normalised at every step
    (``H <- H * n/(n+b) + 2/(n+b) X^T X``) so that it never grows with the number of tokens.
    """

    def __init__(self, cols: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, name: str = ""):
        self.H = torch.zeros(cols, cols, device=device, dtype=dtype)
        self.nsamples = 0
        self.name = name

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1])
        b = x.shape[0]
        if b == 0:
            return
        if x.dtype != self.H.dtype:
            x = x.to(self.H.dtype)
        x = x.to(self.H.device)
        total = self.nsamples + b
        self.H.mul_(self.nsamples / total)
        if self.H.device.type == "cpu" and x.shape[1] >= 512:
            _add_xtx_symmetric(self.H, x, 2.0 / total)
        else:
            self.H.addmm_(x.t(), x, alpha=2.0 / total)
        self.nsamples = total
        if not torch.isfinite(self.H).all():
            raise SolverError(
                f"layer {self.name or '?'}: calibration inputs contain NaN or Inf (check the model's dtype, "
                "the calibration data, and the layers before this one)"
            )


def _add_xtx_symmetric(H: torch.Tensor, x: torch.Tensor, alpha: float) -> None:
    """``H += alpha * x^T x`` computing only the upper block triangle (about a third less work on CPU)."""
    d = x.shape[1]
    nb = min(4, d // 256)
    cuts = [(i * d) // nb for i in range(nb + 1)]
    for i in range(nb):
        a, b = cuts[i], cuts[i + 1]
        xi = x[:, a:b]
        for j in range(i, nb):
            c, e = cuts[j], cuts[j + 1]
            blk = xi.t().matmul(x[:, c:e])
            H[a:b, c:e].add_(blk, alpha=alpha)
            if j > i:
                H[c:e, a:b].add_(blk.t(), alpha=alpha)


