"""SparseGPT for one weight matrix (Frantar & Alistarh, 2023), with joint quantization.

Torch only: this module knows nothing of transformers or of file formats.

    W [rows, cols], calibration inputs X [tokens, cols]
    H = 2/n X^T X  (streamed, float32 or float64)      -> HessianAccumulator
    H += damp * mean(diag H) * I  (x10 until Cholesky succeeds)
    U = chol(H^-1, upper)
    for each block of B columns, for each column j:
        every M columns (N:M) or every Bs columns (unstructured): drop the weights with the smallest
        w^2 / U_jj^2
        q_j = 0 where dropped, else the quantized w_j (group grid fitted to the weights that survive)
        err = (w_j - q_j) / U_jj;  W[:, j:] -= err * U[j, j:]     (OBS update, lazily per block)

Beside it: ``saliency="isc"`` (Shao et al.'s w^2 ([H]_jj + 1/[H^-1]_jj) for the choice) and a fixed ``mask`` for
the sweep (used after ADMM, `solver.admm`).
"""
from __future__ import annotations

import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Callable, Optional

import torch

from ..quant import QuantSpec, codes_of, fit_params, quantize
from .columns import run_columns
from .errors import SolverError


SALIENCIES = ("obs", "isc")


@dataclass
class SolveResult:
    weight: torch.Tensor  # [rows, cols] float32: zeros and the dequantized kept values
    mask: torch.Tensor  # [rows, cols] bool: True = pruned
    scales: Optional[torch.Tensor] = None  # [rows, ngroups] float32 (exact values of scale_dtype)
    zeros: Optional[torch.Tensor] = None  # [rows, ngroups] float32 integer-valued
    damp: float = 0.0
    damp_escalations: int = 0
    rel_error: float = 0.0
    seconds: float = 0.0
    dead_inputs: int = 0
    error: float = 0.0  # tr((Wq - W) H (Wq - W)^T): rel_error's numerator (rows add up: a row slice's part)
    norm: float = 0.0  # tr(W H W^T): its denominator
    factor: Optional[tuple] = None  # (U, damp, escalations): the inverse Cholesky factor, for a second sweep on H

    def codes(self, spec: QuantSpec) -> torch.Tensor:
        """Integer codes [rows, cols] (uint8) recovered from the weight and the scales."""
        scale, zero = expand_groups(self.scales, self.zeros, self.weight.shape[1], spec.group_size)
        return codes_of(self.weight, scale, zero, spec.maxq).to(torch.uint8)


def expand_groups(scales: torch.Tensor, zeros: torch.Tensor, cols: int, group_size: Optional[int]):
    """[rows, ngroups] -> [rows, cols] (the last group may be narrower than the others)."""
    g = group_size or cols
    idx = torch.arange(cols, device=scales.device) // g
    return scales[:, idx], zeros[:, idx]


def _inverse_cholesky(H: torch.Tensor, damp: float, name: str) -> tuple[torch.Tensor, float, int]:
    """Upper Cholesky factor of (H + damp*mean(diag H)*I)^-1, escalating damp x10 on failure."""
    mean_diag = torch.mean(torch.diag(H)).item()
    if not math.isfinite(mean_diag) or mean_diag <= 0:
        mean_diag = 1.0
    escalations = 0
    d = damp
    for _ in range(8):
        # at most three cols x cols matrices alive at once besides H (what bounds a large layer's memory)
        Hd = H.clone()
        Hd.diagonal().add_(d * mean_diag)
        L, info = torch.linalg.cholesky_ex(Hd)
        del Hd
        if info.item() == 0:
            Hinv = torch.cholesky_inverse(L)
            del L
            U, info2 = torch.linalg.cholesky_ex(Hinv, upper=True)
            del Hinv
            if info2.item() == 0 and torch.isfinite(U).all():
                return U, d, escalations
        d *= 10.0
        escalations += 1
    raise SolverError(f"layer {name}: the Hessian is not positive definite even with damp={d / 10:g}")


def _choose_nm(tmp: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Mask (True = prune) of the M-N smallest saliencies in every group of M columns of ``tmp`` [rows, k*m]."""
    rows, c = tmp.shape
    t = tmp.reshape(rows, c // m, m)
    idx = torch.topk(t, m - n, dim=2, largest=False).indices
    mask = torch.zeros_like(t, dtype=torch.bool).scatter_(2, idx, True)
    return mask.reshape(rows, c)


def _smallest(flat: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of exactly ``k`` smallest entries of the 1-D ``flat``, ties at the threshold broken by position
    (a k-th value selection: several times faster than ``topk`` when k is a large share of the entries)."""
    n = flat.numel()
    if k <= 0:
        return torch.zeros(n, dtype=torch.bool, device=flat.device)
    if k >= n:
        return torch.ones(n, dtype=torch.bool, device=flat.device)
    thr = flat.kthvalue(k).values if flat.device.type == "cpu" else flat.topk(k, largest=False).values.max()
    mask = flat < thr
    need = k - int(mask.sum())
    if need > 0:
        mask[torch.nonzero(flat == thr).flatten()[:need]] = True
    return mask


def _choose_unstructured(tmp: torch.Tensor, k: int) -> torch.Tensor:
    """Mask of exactly ``k`` smallest entries of ``tmp`` (ties broken by position)."""
    return _smallest(tmp.flatten(), k).view_as(tmp)


def sparsegpt_solve(
    W: torch.Tensor,
    H: torch.Tensor,
    *,
    sparsity: float = 0.5,
    n: int = 0,
    m: int = 0,
    quant: Optional[QuantSpec] = None,
    blocksize: int = 128,
    mask_blocksize: int = 128,
    damp: float = 0.01,
    fit_scales_to_kept: bool = True,
    refit_scales: bool = True,
    saliency: str = "obs",
    mask: Optional[torch.Tensor] = None,
    name: str = "",
    factor: Optional[tuple] = None,
    measure: bool = True,
    workers: int = 1,
    sweep: str = "auto",
) -> SolveResult:
    """Prune (N:M when ``n`` and ``m`` are set, else unstructured at ``sparsity``) and optionally quantize ``W``.

    ``H`` is the layer Hessian (``HessianAccumulator.H``); it is not modified. ``saliency`` ranks the weights to
    drop: ``"obs"`` is SparseGPT's ``w^2 / [H^-1]_jj^2``, ``"isc"`` Shao et al.'s ``w^2 ([H]_jj + 1/[H^-1]_jj)``
    (``[H^-1]_jj`` the running OBS diagonal, ``U_jj^2``). ``mask`` (True = pruned) fixes the mask instead of
    choosing it: the sweep then only quantizes the kept weights and spreads the errors (used after ADMM).
    ``factor``: the ``SolveResult.factor`` of an earlier sweep on the same ``H`` and ``damp``, reused instead of
    factorising again. ``measure=False`` skips the layer error (``error``, ``norm`` and ``rel_error`` stay 0) where
    the caller measures it itself. ``workers``: threads for the matrix products after the sweep (the scale refit,
    the layer error), in slices of rows; the result does not depend on it. The sweep itself runs in the calling
    thread (`solver.solve_layer` solves slices of rows on threads). ``sweep``: ``"torch"`` (`solver.columns`),
    ``"triton"`` (a block per kernel launch, `solver.sweep_kernel`: CUDA, or CPU tensors under ``TRITON_INTERPRET=1``)
    or ``"auto"`` (the kernel on CUDA with triton installed); blocks the kernel does not take go to torch.
    """
    if saliency not in SALIENCIES:
        raise SolverError(f"layer {name}: saliency {saliency!r} is not one of {SALIENCIES}")
    t0 = time.perf_counter()
    rows, cols = W.shape
    W0 = W.detach().to(torch.float32)
    prune = n > 0 or sparsity > 0 or mask is not None
    if not prune and quant is None:
        return SolveResult(weight=W0.clone(), mask=torch.zeros_like(W0, dtype=torch.bool), seconds=time.perf_counter() - t0)
    if n and cols % m:
        raise SolverError(f"layer {name}: {cols} input columns are not a multiple of M={m} for the {n}:{m} pattern")
    kernel = kernel_sweep(sweep, W0.device, name)
    sweep = _Sweep.start(W0, H, factor, damp, saliency, mask, name)
    sweep.n, sweep.m, sweep.sparsity, sweep.prune = n, m, sparsity, prune
    sweep.mask_blocksize, sweep.fit_scales_to_kept, sweep.workers = mask_blocksize, fit_scales_to_kept, workers
    sweep.kernel = kernel
    sweep.set_grid(quant)
    g = quant.group_size if quant is not None else None
    if g and g < cols:
        # groups must not straddle a lazy block: make the block a multiple of the group (for the kernel, the group:
        # its grid is then fitted at the block's first column)
        blocksize = g if kernel and g < blocksize else max(blocksize // g, 1) * g
    for i1 in range(0, cols, blocksize):
        sweep.block(i1, min(i1 + blocksize, cols))
    return sweep.finish(W0, H, refit_scales, measure, t0, workers)


class _Sweep:
    """The state of one SparseGPT sweep over a matrix's columns: the weights being updated (``Wf``, in H's dtype),
    the inverse Cholesky factor ``U``, the mask and the group grids. ``block(i1, i2)`` does one lazy block."""

    n = m = 0
    sparsity = 0.0
    prune = True
    mask_blocksize = 128
    fit_scales_to_kept = True
    workers = 1
    kernel = False  # walk the blocks the kernel takes with `sweep_kernel` (see `kernel_fits`)
    quant: Optional[QuantSpec] = None
    scales = zeros = None
    grid_cache: tuple = (None, None, None)  # (group index, (scale, lowest, highest), zero)

    @classmethod
    def start(cls, W0, H, factor, damp, saliency, mask, name) -> "_Sweep":
        """Dead inputs zeroed, the factor of the damped Hessian, ISC's diagonal, the fixed mask applied."""
        self = cls()
        self.Wf = W0.to(H.dtype).clone()
        self.hdtype = H.dtype
        dead = torch.diag(H) == 0
        self.dead = int(dead.sum().item())
        if self.dead:  # the caller's H is not modified: copy only when there is something to change
            H = H.clone()
            H[dead, dead] = 1.0
        self.Wf[:, dead] = 0.0
        self.U, self.damp, self.escalations = factor if factor is not None else _inverse_cholesky(H, damp, name)
        if self.dead:
            H[dead, dead] = 0.0
        # ISC's [H]_jj term, on the damped diagonal the OBS factor was computed from
        self.hdiag = torch.diag(H) + self.damp * torch.mean(torch.diag(H)) if saliency == "isc" else None
        self.fixed = mask.to(W0.device, torch.bool) if mask is not None else None
        if self.fixed is not None:
            if self.fixed.shape != W0.shape:
                raise SolverError(f"layer {name}: mask of shape {tuple(self.fixed.shape)} for a weight of {tuple(W0.shape)}")
            self.Wf[self.fixed] = 0.0
        self.mask = torch.zeros(W0.shape, dtype=torch.bool, device=W0.device)
        return self

    def set_grid(self, quant: Optional[QuantSpec]) -> None:
        """Room for the group scales; per channel, one grid per row fitted on the whole row up front (as GPTQ)."""
        self.quant = quant
        if quant is None:
            return
        rows, cols = self.Wf.shape
        self.g = quant.group_size
        self.scales = torch.zeros(rows, quant.ngroups(cols), dtype=torch.float32, device=self.Wf.device)
        self.zeros = torch.zeros(rows, quant.ngroups(cols), dtype=torch.float32, device=self.Wf.device)
        if not self.g:
            keep0 = None
            if self.fixed is not None:
                keep0 = ~self.fixed
            elif self.prune and self.fit_scales_to_kept:
                keep0 = ~_provisional_mask(self.Wf, self.U, self.sparsity, self.n, self.m, self.hdiag)
            s, z = fit_params(self.Wf.float(), quant, keep0, _obs_weight(self.U))
            self.scales[:, 0:1], self.zeros[:, 0:1] = s, z

    def cost(self, w: torch.Tensor, col: int, d: torch.Tensor) -> torch.Tensor:
        """Saliency of ``w`` (squared weights, or a gain), whose first column is column ``col`` of the matrix
        (``d`` their U diagonal)."""
        if self.hdiag is None:
            return w / d.reshape(1, -1) ** 2
        return w * (self.hdiag[col:col + w.shape[1]].reshape(1, -1) + 1.0 / d.reshape(1, -1) ** 2)

    def block(self, i1: int, i2: int) -> None:
        """Columns i1:i2: mask, quantize and OBS-update column by column inside the block, then the block's errors
        onto the columns after it (the lazy update). The block is held transposed (its column ``j`` is the
        contiguous row ``Wt[j]``), and each update is one product and one difference, each rounded: a weight's
        bits depend neither on the layout nor on how many rows are solved together."""
        if self.kernel and self.kernel_fits(i1, i2 - i1):
            return self.block_kernel(i1, i2)
        Wt = self.Wf[:, i1:i2].t().contiguous()
        count, rows = Wt.shape
        Et, prod = torch.empty_like(Wt), torch.empty_like(Wt)
        U1 = self.U[i1:i2, i1:i2]
        d1 = torch.diag(U1)
        self.d2 = d1.reshape(-1, 1) ** 2  # the saliency's denominators, once per block
        fixed = self.fixed is not None
        maskt = self.fixed[:, i1:i2].t().contiguous() if fixed else torch.zeros_like(Wt, dtype=torch.bool)
        # unquantized, the kept values are Wt where not pruned (Wt[i] is not changed after column i's step)
        Qt = torch.empty_like(Wt) if self.quant is not None else None
        inline_nm = bool(self.n) and not fixed and self.quant is None and self.hdiag is None
        stops, dl = sorted(self.stops(i1, count, inline_nm)) + [count], d1.tolist()
        for a, b in zip(stops[:-1], stops[1:]):
            scale, lo, hi = self.choose(Wt, maskt, d1, i1, a, inline_nm) or (None, None, None)
            args = (Wt, maskt, Et, Qt, prod, U1, dl, self.d2, a, b, scale, lo, hi, self.n if inline_nm else 0, self.m)
            run_columns(args)
        self.Wf[:, i1:i2] = Qt.t() if Qt is not None else Wt.masked_fill_(maskt, 0.0).t()
        self.mask[:, i1:i2] = maskt.t()
        if i2 < self.Wf.shape[1]:
            self.Wf[:, i2:] -= Et.t().contiguous().matmul(self.U[i1:i2, i2:])

    def kernel_fits(self, i1: int, count: int) -> bool:
        """Whether `sweep_kernel` takes the block: OBS saliency, float32, and nothing to choose after its first column
        but the N:M groups (of a power-of-two M)."""
        if self.hdiag is not None or self.Wf.dtype != torch.float32:
            return False
        if self.n and self.fixed is None and self.m & (self.m - 1):
            return False
        return self.stops(i1, count, inline_nm=True) == {0}

    def block_kernel(self, i1: int, i2: int) -> None:
        """`block` as one kernel launch (`solver.sweep_kernel`): the grid, or the unstructured mask, chosen here at
        the block's first column; the N:M choice, the kept values, the errors and the updates inside the block in the
        kernel; then the lazy update. No host sync."""
        from .sweep_kernel import sweep_block

        Wb, U1 = self.Wf[:, i1:i2], self.U[i1:i2, i1:i2]
        mask = self.fixed[:, i1:i2].clone() if self.fixed is not None else torch.zeros_like(Wb, dtype=torch.bool)
        d1 = torch.diag(U1)
        self.d2 = d1.reshape(-1, 1) ** 2
        grid = self.choose(Wb.t(), mask.t(), d1, i1, 0, inline_nm=True)
        grid = tuple(t.contiguous() for t in grid) if grid is not None else None
        mk = mask.to(torch.uint8)
        E = sweep_block(Wb, U1, mk, grid, self.n, self.m, choose=bool(self.n) and self.fixed is None)
        self.mask[:, i1:i2] = mk.bool()
        if i2 < self.Wf.shape[1]:
            self.Wf[:, i2:] -= E.matmul(self.U[i1:i2, i2:])

    def stops(self, i1: int, count: int, inline_nm: bool) -> set[int]:
        """The columns of the block where `choose` has work: its first (the grid), and the first of each quantization
        group, unstructured mask block and (unless `columns` chooses them, ``inline_nm``) group of M."""
        stops = {0}
        if self.quant is not None and self.g:
            stops.update(i for i in range(count) if (i1 + i) % self.g == 0)
        if self.n and self.fixed is None and not inline_nm:
            stops.update(range(0, count, self.m))
        if self.fixed is None and self.prune and not self.n:
            stops.update(range(0, count, self.mask_blocksize))
        return stops

    def choose(self, Wt, maskt, d1, i1: int, i: int, inline_nm: bool = False):
        """Before column ``i`` of the block (``Wt``, ``maskt``: the block transposed): the unstructured mask of its
        mask block, its group's grid, and the N:M mask of its group of M. Returns the column's grid
        ``(scale, lowest, highest)`` as [rows] tensors (the code range less the zero point), or None."""
        col = i1 + i
        count = Wt.shape[0]
        if self.fixed is None and self.prune and not self.n and i % self.mask_blocksize == 0:
            j2 = min(i + self.mask_blocksize, count)
            tmp = self.cost(Wt[i:j2].t() ** 2, col, d1[i:j2])
            rows = Wt.shape[1]
            k = round(self.sparsity * rows * (col + j2 - i)) - round(self.sparsity * rows * col)
            maskt[i:j2] = _choose_unstructured(tmp, k).t()
        grid = None
        if self.quant is not None:
            if self.g and col % self.g == 0:
                self.fit_group(Wt, maskt, d1, i1, i)
            gi = col // self.g if self.g else 0
            if self.grid_cache[0] != gi:  # the group's grid, once per group
                scale, zero = self.scales[:, gi].to(self.hdtype), self.zeros[:, gi].to(self.hdtype)
                self.grid_cache = (gi, (scale, -zero, self.quant.maxq - zero), zero)
            grid = self.grid_cache[1]
        if self.n and self.fixed is None and not inline_nm and i % self.m == 0:
            self.choose_nm(Wt[i:i + self.m], maskt[i:i + self.m], col, d1[i:i + self.m], i)
        return grid

    def choose_nm(self, wm, mask_m, col: int, dm, i: int) -> None:
        """The N:M mask of one group of M columns (``wm``: [M, rows], its mask ``mask_m`` all False before, written
        here): drop the M-N weights of least OBS cost, less what keeping them would cost anyway (their
        quantization error)."""
        if self.quant is None:
            gain = wm**2
        else:
            scale, zero = self.grid_cache[1][0], self.grid_cache[2]
            gain = wm**2 - (wm - quantize(wm, scale, zero, self.quant.maxq)) ** 2
        tmp = gain / self.d2[i:i + self.m] if self.hdiag is None else self.cost(gain.t(), col, dm).t()
        idx = torch.topk(tmp, self.m - self.n, dim=0, largest=False).indices
        mask_m.scatter_(0, idx, True)

    def fit_group(self, Wt, maskt, d1, i1: int, i: int) -> None:
        """The grid of the group starting at column ``i`` of the block, fitted to the weights that survive."""
        col = i1 + i
        ge = min(i + self.g, Wt.shape[0])
        w = Wt[i:ge].t().contiguous()
        keep = None
        if self.fixed is not None:
            keep = ~maskt[i:ge].t()
        elif self.prune and self.fit_scales_to_kept:
            keep = ~maskt[i:ge].t() if not self.n else ~_choose_nm(self.cost(w ** 2, col, d1[i:ge]), self.n, self.m)
        s, z = fit_rows(w.float(), self.quant, keep, 1.0 / d1[i:ge].float() ** 2, self.workers)
        self.scales[:, col // self.g:col // self.g + 1], self.zeros[:, col // self.g:col // self.g + 1] = s, z
        self.grid_cache = (None, None, None)

    def finish(self, W0, H, refit_scales: bool, measure: bool, t0: float, workers: int = 1) -> SolveResult:
        """Exact zeros on the mask, the scales refitted (with a grid), the layer error measured."""
        Wq = self.Wf.to(torch.float32)
        Wq[self.mask] = 0.0  # exact zeros (also of dead inputs already zeroed)
        scales = self.scales
        if self.quant is not None and refit_scales:
            Wq, scales, num, den = _refit_scales(Wq, W0, H, scales, self.quant, workers)
        elif measure:
            num, den = quad_form(Wq, H, W0, workers=workers), quad_form(W0, H, workers=workers)
        else:
            num = den = 0.0
        return SolveResult(
            weight=Wq, mask=self.mask, scales=scales, zeros=self.zeros, damp=self.damp,
            damp_escalations=self.escalations, rel_error=num / den if den > 0 else 0.0,
            seconds=time.perf_counter() - t0, dead_inputs=self.dead, error=num, norm=den,
            factor=(self.U, self.damp, self.escalations),
        )



SWEEPS = ("auto", "torch", "triton")


def kernel_sweep(sweep: str, device: torch.device, name: str = "") -> bool:
    """Whether ``sweep`` (one of `SWEEPS`) walks the blocks with the Triton kernel on ``device``."""
    at = f"layer {name}: " if name else ""
    if sweep not in SWEEPS:
        raise SolverError(f"{at}sweep {sweep!r} is not one of {SWEEPS}")
    if sweep == "torch" or (sweep == "auto" and device.type != "cuda"):
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        if sweep == "auto":
            return False
        raise SolverError(f"{at}sweep 'triton' needs triton (pip install 'sparsegpt-export[gpu]')") from None
    if device.type == "cuda":
        return True
    if sweep == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        raise SolverError(f"{at}sweep 'triton' runs on a CUDA device, or on CPU tensors with TRITON_INTERPRET=1 "
                          "set before triton is imported")
    return sweep == "triton"


FIT_SLICE_ROWS = 1024  # rows per thread in `fit_rows` (fewer rows: the steps are too small to gain from threads)


def fit_rows(w: torch.Tensor, spec: QuantSpec, keep: Optional[torch.Tensor], col_weight: torch.Tensor,
             workers: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """`quant.fit_params` (one grid per row) in slices of rows on ``workers`` threads; the same result."""
    rows = w.shape[0]
    parts = row_ranges(rows, max(FIT_SLICE_ROWS, -(-rows // max(1, workers))))
    fits = map_rows(partial(_fit_slice, w, spec, keep, col_weight), parts, workers)
    if len(fits) == 1:
        return fits[0]
    return torch.cat([f[0] for f in fits]), torch.cat([f[1] for f in fits])


def _fit_slice(w, spec: QuantSpec, keep, col_weight, rows: slice):
    return fit_params(w[rows], spec, None if keep is None else keep[rows], col_weight)


def _obs_weight(U: torch.Tensor) -> torch.Tensor:
    return 1.0 / torch.diag(U).float() ** 2


def _refit_scales(Wq, W0, H, scales, spec: QuantSpec, workers: int = 1):
    """With the mask and the integer codes fixed, choose each row's group scales by least squares in the layer
    objective ``(Wq - W) H (Wq - W)^T`` (one small [ngroups x ngroups] system per row, float64), rounded to the
    storage dtype. A row keeps its old scales unless the new ones lower its error.
    Returns ``(weight, scales, error, norm)``: the layer's ``sum (Wq-W) H (Wq-W)^T`` and ``sum W H W^T``.
    Rows are independent: they are done in slices, whose float64 copies stay about 4 MB each, on ``workers``
    threads; the result does not depend on either.
    """
    rows, cols = Wq.shape
    step = max(1, (4 << 20) // (8 * cols))
    parts = map_rows(partial(_refit_rows, Wq, W0, H, scales, spec), row_ranges(rows, step, workers), workers)
    # each row's error and norm (float64), added over all rows at once: the sums do not depend on the slices
    return tuple(torch.cat([p[k] for p in parts]) for k in range(2)) + tuple(
        torch.cat([p[k] for p in parts]).sum().item() for k in (2, 3))


def _refit_rows(Wq, W0, H, scales, spec: QuantSpec, rows: slice):
    """`_refit_scales` on the rows ``rows``."""
    Wq, W0, scales = Wq[rows], W0[rows], scales[rows]
    rows, cols = Wq.shape
    G = scales.shape[1]
    dev = Wq.device
    idx = torch.arange(cols, device=dev) // (spec.group_size or cols)
    C = torch.round(Wq / scales[:, idx])  # code - zero: integers, 0 where pruned
    Cd, W0d = C.to(torch.float64), W0.to(torch.float64)
    # H in float64 one group of rows at a time (never the whole cols x cols copy): HW = W H, A[:, a] = C_a H_a C^T
    g = spec.group_size or cols
    HW = torch.zeros(rows, cols, dtype=torch.float64, device=dev)
    A = torch.zeros(rows, G, G, dtype=torch.float64, device=dev)
    for a in range(G):
        lo, hi = a * g, min((a + 1) * g, cols)
        Ha = H[lo:hi, :].to(torch.float64)
        HW.addmm_(W0d[:, lo:hi], Ha)
        CHa = Cd[:, lo:hi].matmul(Ha)
        A[:, a, :].index_add_(1, idx, CHa * Cd)
    b = torch.zeros(rows, G, dtype=torch.float64, device=dev).index_add_(1, idx, Cd * HW)
    diag = A.diagonal(dim1=1, dim2=2)
    empty = diag <= 0
    ridge = 1e-9 * diag.clamp(min=0).mean(dim=1, keepdim=True) + 1e-30
    pad = torch.diag_embed(torch.where(empty, torch.ones_like(diag), ridge))
    new = torch.linalg.solve(A + pad, torch.where(empty, scales.to(torch.float64), b).unsqueeze(-1)).squeeze(-1)
    ok = torch.isfinite(new) & (new > 0)
    new = torch.where(ok, new, scales.to(torch.float64)).to(spec.scale_dtype).to(torch.float32)
    new = torch.where(new > 0, new, scales)  # underflow in the storage dtype
    # per row: (sC - W) H (sC - W)^T = s^T A s - 2 s.b + W H W^T, with A and b of the codes (no ridge)
    wHw = (HW * W0d).sum(dim=1)

    def row_err(s):
        s = s.to(torch.float64)
        return torch.einsum("rg,rgh,rh->r", s, A, s) - 2 * (s * b).sum(dim=1) + wHw

    e_old, e_new = row_err(scales), row_err(new)
    better = e_new < e_old
    scales = torch.where(better[:, None], new, scales)
    return C * scales[:, idx], scales, torch.where(better, e_new, e_old), wHw


def _provisional_mask(Wf, U, sparsity, n, m, hdiag=None):
    """The mask the saliency would choose now on the whole matrix, for fitting a per-row grid up front."""
    d2 = torch.diag(U).reshape(1, -1) ** 2
    tmp = Wf**2 / d2 if hdiag is None else Wf**2 * (hdiag.reshape(1, -1) + 1.0 / d2)
    if n:
        return _choose_nm(tmp, n, m)
    return _choose_unstructured(tmp, round(sparsity * tmp.numel()))


def measure_error(Wq: torch.Tensor, W: torch.Tensor, H: torch.Tensor, workers: int = 1) -> tuple[float, float]:
    """``(tr((Wq - W) H (Wq - W)^T), tr(W H W^T))``: a layer error's numerator and denominator."""
    return quad_form(Wq, H, W, workers=workers), quad_form(W, H, workers=workers)


def layer_error(Wq: torch.Tensor, W0: torch.Tensor, H: torch.Tensor, workers: int = 1) -> float:
    """``tr((Wq - W0) H (Wq - W0)^T) / tr(W0 H W0^T)``: the layer's relative output error on the calibration inputs."""
    num, den = measure_error(Wq, W0, H, workers)
    return num / den if den > 0 else 0.0


def quad_form(A: torch.Tensor, H: torch.Tensor, minus: Optional[torch.Tensor] = None,
              slice_bytes: int = 4 << 20, workers: int = 1) -> float:
    """``tr(D H D^T)`` for ``D = A - minus`` (or ``A``): each row's ``d H d^T`` in ``H``'s dtype, the rows added in
    float64. By row slices of about ``slice_bytes``, so that the temporaries stay small beside a large layer, on
    ``workers`` threads; the result depends on neither."""
    rows, cols = A.shape
    step = max(1, slice_bytes // (H.element_size() * cols))
    per_row = map_rows(partial(_quad_rows, A, H, minus), row_ranges(rows, step, workers), workers)
    return torch.cat(per_row).sum().item()


def _quad_rows(A: torch.Tensor, H: torch.Tensor, minus: Optional[torch.Tensor], rows: slice) -> torch.Tensor:
    a = A[rows].to(H.dtype)
    if minus is not None:
        a = a - minus[rows].to(H.dtype)
    return (a.matmul(H) * a).sum(dim=1, dtype=torch.float64)


def row_ranges(rows: int, step: int, workers: int = 1) -> list[slice]:
    """Slices of at most ``step`` rows, about equal, and at least ``workers`` of them (as many as there are rows)."""
    if rows <= 0:
        return [slice(0, 0)]
    count = max(-(-rows // max(1, step)), min(workers, rows))
    size = -(-rows // max(1, count))
    return [slice(r, min(r + size, rows)) for r in range(0, rows, size)]


def map_rows(fn: Callable, parts: list, workers: int = 1) -> list:
    """``[fn(part) for part in parts]``, on up to ``workers`` threads (for matrix products, which run outside the
    interpreter lock), in order."""
    if workers <= 1 or len(parts) <= 1:
        return [fn(part) for part in parts]
    with ThreadPoolExecutor(min(workers, len(parts))) as pool:
        return list(pool.map(fn, parts))


def magnitude_prune(W: torch.Tensor, *, sparsity: float = 0.5, n: int = 0, m: int = 0) -> torch.Tensor:
    """Baseline: the same mask rule with saliency |w| and no weight update. Returns the pruned weight."""
    W = W.detach().float().clone()
    tmp = W.abs()
    mask = _choose_nm(tmp, n, m) if n else _choose_unstructured(tmp, round(sparsity * W.numel()))
    W[mask] = 0.0
    return W
