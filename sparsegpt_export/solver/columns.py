"""The inner steps of the column sweep (`solver.obs`): columns ``start:end`` of one lazy block, on a slice of rows.

The block is held transposed: ``Wt[j]`` is column ``j`` of the block (one entry per row of the weight). For each
column ``j``: (N:M, when ``n``: at the first column of each group of M, the M - N weights of least
``w^2 / [U]_jj^2`` dropped), its kept value ``Qt[j]`` (quantized on the grid ``scale, lo, hi``, 0 where pruned),
its error ``Et[j] = (w - kept) / U_jj``, and ``Wt[j+1:] -= U[j, j+1:]^T Et[j]``, one product and one difference,
each rounded. Every step is elementwise along the rows (or, for the N:M choice, within one row), so any slice of
the rows gives what the whole gives those rows.

The steps are small, so they are mostly interpreter time: `run_columns` runs them as TorchScript, which is quicker
per step and releases Python's interpreter lock, so that slices of rows solved on several threads
(`solver.solve_layer`) really run at once; where TorchScript is not available the same function runs in Python, with
the same operations and the same bits. On a GPU a whole block is one kernel instead (`solver.sweep_kernel`).
"""
from __future__ import annotations

import warnings
from typing import List, Optional

import torch


def columns(Wt: torch.Tensor, maskt: torch.Tensor, Et: torch.Tensor, Qt: Optional[torch.Tensor], prod: torch.Tensor,
            U1: torch.Tensor, d: List[float], d2: torch.Tensor, start: int, end: int, scale: Optional[torch.Tensor],
            lo: Optional[torch.Tensor], hi: Optional[torch.Tensor], n: int, m: int) -> None:
    """Columns ``start:end`` of the block (see the module's docstring). ``Qt`` None: unquantized, the kept values
    are left in ``Wt`` (row ``j`` is not changed after its step). ``d`` the U diagonal, ``d2`` its squares [count, 1];
    ``n`` > 0: choose the N:M mask (``maskt`` all False there before)."""
    count = Wt.shape[0]
    zero = torch.zeros((), dtype=Wt.dtype, device=Wt.device)
    for i in range(start, end):
        if n > 0 and i % m == 0:
            tmp = Wt[i:i + m] ** 2 / d2[i:i + m]
            _, idx = torch.topk(tmp, m - n, dim=0, largest=False)
            maskt[i:i + m].scatter_(0, idx, True)
        w, e = Wt[i], Et[i]
        if Qt is None:  # (w - kept) / d: w / d where pruned, 0 where kept
            torch.where(maskt[i], w, zero, out=e)
        else:
            q = Qt[i]
            assert scale is not None and lo is not None and hi is not None  # Qt is given with a grid
            torch.div(w, scale, out=q).round_()
            torch.clamp(q, lo, hi, out=q).mul_(scale)
            q.masked_fill_(maskt[i], 0.0)
            torch.sub(w, q, out=e)
        e.div_(d[i])
        k = count - i - 1
        if k > 0:
            Wt[i + 1:].sub_(torch.mul(U1[i, i + 1:].unsqueeze(1), e, out=prod[:k]))


_SCRIPTED: list = []  # [the TorchScript of `columns`, or None where TorchScript is not available]


def scripted():
    """`columns` as TorchScript (compiled once), or None."""
    if not _SCRIPTED:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch.jit.script is deprecated in PyTorch 2.x (still present)
                _SCRIPTED.append(torch.jit.script(columns))
        except Exception:  # noqa: BLE001 - any failure: run in Python (same operations)
            _SCRIPTED.append(None)
    return _SCRIPTED[0]


def run_columns(args: tuple) -> None:
    """`columns(*args)`, as TorchScript where it is available."""
    (scripted() or columns)(*args)
