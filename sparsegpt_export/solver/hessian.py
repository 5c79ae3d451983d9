"""The layer Hessian ``H = 2/n X^T X`` of a linear layer's calibration inputs, streamed, with the same bits however
the calibration windows are split into chunks (``--calib-batch-size``) or ranks (torchrun).

The windows are taken in groups of ``group_windows(tokens per window, windows)`` (about 4096 tokens), counted from
the first window of the run (a rank's share starts at a group's first window: ``distributed.shard``). Each group's
``X^T X`` is one product over exactly its rows, in the Hessian's dtype, whatever chunks its windows came in; the
group products are added in float64, in window order; ``H = 2/n * sum`` is rounded to the Hessian's dtype once, at
the end. So one process, chunks of any size and several ranks form the same group products; the float64 sums agree
whenever they add without rounding (group products within about 2^25 of each other in magnitude: the case for a
Hessian's entries; the ranks' sums are added last), and H then has the same bits. The running mean it replaces
(``H <- H n/(n+b) + 2/(n+b) X^T X`` in float32 per chunk) rounded differently for every split, and the column
sweep amplifies such last-bit differences into other masks (on SmolLM2 2:4 + 4-bit: 92.5% of the masks of one
process kept by two, perplexity +10%).
"""
from __future__ import annotations

from typing import Optional

import torch

from .errors import SolverError

GROUP_TOKENS = 4096
MIN_GROUPS = 8


def group_windows(tokens_per_window: int, nsamples: Optional[int] = None) -> int:
    """Windows per Hessian group: about ``GROUP_TOKENS`` tokens (one window when a window is longer), and at least
    ``MIN_GROUPS`` groups in the run when it has that many windows (so that up to 8 ranks start their shares at a
    group). A function of the run's shape alone: one process, any chunks and any ranks use the same groups."""
    g = max(1, -(-GROUP_TOKENS // max(1, tokens_per_window)))
    if nsamples:
        g = min(g, max(1, nsamples // MIN_GROUPS))
    return g


class HessianAccumulator:
    """``2/n X^T X`` over the calibration windows added so far (see the module's docstring).

    ``add(x, windows)`` takes the inputs of ``windows`` whole windows, shaped [..., cols] (default: one window);
    ``H`` is the Hessian (float32 or float64, as asked), ``total()`` the float64 sum and the token count (to be
    added over ranks, then ``normalized(sum, n)``).
    """

    def __init__(self, cols: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, name: str = "",
                 group: Optional[int] = None):
        self.cols, self.device, self.dtype, self.name = cols, torch.device(device), dtype, name
        self.sum = torch.zeros(cols, cols, device=device, dtype=torch.float64)
        self.nsamples = 0  # tokens
        self.group = group  # windows per group (None: from the first window's length)
        self._rows: list[torch.Tensor] = []  # the windows of the group being filled
        self._filled = 0  # ... how many
        self._H: Optional[torch.Tensor] = None

    def add(self, x: torch.Tensor, windows: int = 1) -> None:
        x = x.reshape(-1, x.shape[-1])
        if x.shape[0] == 0:
            return
        if windows < 1 or x.shape[0] % windows:
            windows = 1
        per = x.shape[0] // windows
        if self.group is None:
            self.group = group_windows(per)
        self._H = None
        self.nsamples += x.shape[0]
        w = 0
        while w < windows:
            take = min(self.group - self._filled, windows - w)
            self._rows.append(x[w * per:(w + take) * per])
            self._filled += take
            w += take
            if self._filled == self.group:
                self._flush()

    def _flush(self) -> None:
        if not self._rows:
            return
        x = self._rows[0] if len(self._rows) == 1 else torch.cat(self._rows)
        self._rows, self._filled = [], 0
        x = x.to(device=self.device, dtype=self.dtype)
        # the group's product in the Hessian's dtype, added to the float64 sum (block by block on the CPU)
        if self.device.type == "cpu" and self.cols >= 512:
            _add_xtx_symmetric(self.sum, x)
        else:
            self.sum.add_(x.t().matmul(x))

    def total(self) -> tuple[torch.Tensor, int]:
        """The float64 sum of ``X^T X`` (every group flushed) and the number of tokens."""
        self._flush()
        if not torch.isfinite(self.sum).all():  # a NaN or Inf in any group's product stays in the sum
            raise SolverError(
                f"layer {self.name or '?'}: calibration inputs contain NaN or Inf (check the model's dtype, "
                "the calibration data, and the layers before this one)")
        return self.sum, self.nsamples

    def normalized(self, total: torch.Tensor, n: int) -> torch.Tensor:
        """``2/n * total`` in the Hessian's dtype."""
        return (total * (2.0 / n)).to(self.dtype) if n else torch.zeros_like(total, dtype=self.dtype)

    @property
    def H(self) -> torch.Tensor:
        if self._H is None:
            total, n = self.total()
            self._H = self.normalized(total, n)
        return self._H


def _add_xtx_symmetric(total: torch.Tensor, x: torch.Tensor) -> None:
    """``total += x^T x`` (``total`` float64, the product in ``x``'s dtype), computing only the upper block triangle
    (about a third less work on CPU)."""
    d = x.shape[1]
    nb = min(4, d // 256)
    cuts = [(i * d) // nb for i in range(nb + 1)]
    for i in range(nb):
        a, b = cuts[i], cuts[i + 1]
        xi = x[:, a:b]
        for j in range(i, nb):
            c, e = cuts[j], cuts[j + 1]
            blk = xi.t().matmul(x[:, c:e])
            total[a:b, c:e].add_(blk)
            if j > i:
                total[c:e, a:b].add_(blk.t())
