"""Least squares on a sparsity mask by ADMM (Boza, 2024), the mask fixed or chosen gradually.

For N:M masks every step is row by row (each row drops its own share of its N:M candidates), so the rows can be
solved in slices, on several threads (``workers``) or ranks, with the result of the whole matrix: the iterations
are matrix products, which a slice of rows computes as the whole does.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import torch

from .errors import SolverError
from .obs import _choose_nm, _choose_unstructured


def admm_prune(
    W: torch.Tensor,
    H: torch.Tensor,
    *,
    sparsity: float = 0.5,
    n: int = 0,
    m: int = 0,
    iters: int = 40,
    mask_steps: int = 30,
    mask: Optional[torch.Tensor] = None,
    damp: float = 0.01,
    rho: float = 1.0,
    name: str = "",
    init: Optional[torch.Tensor] = None,
    workers: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Least squares on a sparsity mask by ADMM (Boza 2024): ``min (W' - W) H (W' - W)^T`` with W' zero on the mask.

    With ``mask`` (True = pruned) given, the mask stays fixed; ``init`` (weights zero on that mask, e.g. the OBS
    sweep's) is the starting point, and the result is never worse than it in the objective. Otherwise the mask is
    chosen gradually: over the first ``mask_steps`` of the ``iters`` iterations the sparsity grows cubically to its
    target, each step pruning the weights of smallest OBS saliency ``|W + U| / sqrt([H^-1]_jj)`` (N:M: each row
    among the weights the N:M rule would drop, so the last step is exactly N:M; unstructured: over the whole
    matrix). The problem is solved in coordinates scaled by ``sqrt(diag H)``, with ``damp * mean(diag)`` added to
    the Hessian and one ``(H + rho I)^-1`` for all iterations. ``workers`` > 1 solves slices of rows on that many
    threads (N:M or a fixed mask only; the result is the same).
    Returns ``(weight [rows, cols] float32 with exact zeros on the mask, mask)``.
    """
    rows, cols = W.shape
    if n and cols % m:
        raise SolverError(f"layer {name}: {cols} input columns are not a multiple of M={m} for the {n}:{m} pattern")
    if mask is None and mask_steps < 1:
        raise SolverError(f"layer {name}: ADMM needs a mask or mask_steps >= 1")
    p = _Problem(W, H, damp, rho, name, need_saliency=mask is None)
    p.n, p.m, p.iters, p.mask_steps, p.rho = n, m, iters, mask_steps, rho
    p.full = (1.0 - n / m) if n else sparsity
    keep = None if mask is None else ~mask.to(W.device, torch.bool)
    X0 = p.Wn.clone() if init is None else init.to(p.Wn.dtype) * p.norm[None, :]
    if keep is not None:
        X0 = X0 * keep
    slices = row_slices(rows, workers if (n or keep is not None) else 1)
    if len(slices) == 1:
        Z, keep = p.iterate(X0, keep, slice(0, rows))
    else:
        with ThreadPoolExecutor(len(slices)) as pool:
            parts = list(pool.map(lambda s: p.iterate(X0[s], None if keep is None else keep[s], s), slices))
        Z, keep = torch.cat([z for z, _ in parts]), torch.cat([k for _, k in parts])
    if init is not None and mask is not None:
        Z = _better(Z, X0, p)
    out = (Z / p.norm[None, :]).to(torch.float32)
    out[:, p.dead] = 0.0
    return out, ~keep


class _Problem:
    """One layer's problem in scaled coordinates: ``Hn``, ``Wn``, the target ``Wn Hn`` and ``(Hn + rho I)^-1``;
    ``iterate`` runs the ADMM iterations on a slice of rows."""

    n = m = iters = mask_steps = 0
    full = rho = 0.0

    def __init__(self, W, H, damp: float, rho: float, name: str, need_saliency: bool):
        self.Hn, self.Wn, self.norm, self.dead = _scaled(W, H, damp)
        self.target = self.Wn.matmul(self.Hn)
        A = self.Hn.clone()
        A.diagonal().add_(rho)
        self.Ainv = _inverse(A, name)
        # OBS saliency in the scaled coordinates: |w| / sqrt([H^-1]_jj)
        self.obs_scale = (torch.diag(_inverse(self.Hn, name)).clamp(min=1e-30).rsqrt()[None, :]
                          if need_saliency else None)

    def iterate(self, X: torch.Tensor, keep: Optional[torch.Tensor], rows: slice):
        """The iterations on the rows ``rows`` from ``X``: ``(Z, keep)``, Z zero where keep is False."""
        target = self.target[rows]
        U = torch.zeros_like(X)
        fixed = keep is not None
        for t in range(self.iters):
            if not fixed and t < self.mask_steps:
                share = 1.0 - (1.0 - (t + 1) / self.mask_steps) ** 3
                keep = ~_gradual_drop((X + U).abs() * self.obs_scale, share, self.full, self.n, self.m)
            Z = (X + U) * keep
            U += X - Z
            X = (target + self.rho * (Z - U)).matmul(self.Ainv)
        return (X + U) * keep, keep

    def objective(self, Z: torch.Tensor) -> torch.Tensor:
        """Per row: ``(Z - Wn) Hn (Z - Wn)^T``."""
        D = Z - self.Wn
        return (D.matmul(self.Hn) * D).sum(dim=1)


def _better(Z: torch.Tensor, X0: torch.Tensor, p: _Problem) -> torch.Tensor:
    """Row by row, the lower-objective of the iterations' result and the starting point."""
    worse = p.objective(Z) > p.objective(X0)
    return torch.where(worse[:, None], X0, Z)


def row_slices(rows: int, workers: int, least: int = 64) -> list[slice]:
    """``workers`` slices of about equal rows (fewer when a slice would have under ``least`` rows)."""
    workers = max(1, min(workers, rows // least or 1))
    step = -(-rows // workers)
    return [slice(lo, min(lo + step, rows)) for lo in range(0, rows, step)]


def _scaled(W: torch.Tensor, H: torch.Tensor, damp: float):
    """The problem in coordinates scaled by ``sqrt(diag H)``: ``(Hn, Wn, norm, dead)``, the damping added to Hn's
    diagonal and dead inputs (zero diagonal) cut out."""
    dt = torch.float64 if H.dtype == torch.float64 else torch.float32
    Hd = H.to(dt)
    diag = torch.diag(Hd)
    dead = diag <= 0
    norm = torch.where(dead, torch.ones_like(diag), diag.clamp(min=0).sqrt())
    Hn = Hd / norm[:, None] / norm[None, :]
    Hn[dead, :] = 0.0
    Hn[:, dead] = 0.0
    idx = torch.arange(H.shape[0], device=H.device)
    Hn[idx, idx] = torch.where(dead, torch.ones_like(diag), torch.diag(Hn)) + damp * torch.diag(Hn).mean()
    Wn = W.detach().to(dt) * norm[None, :]
    Wn[:, dead] = 0.0
    return Hn, Wn, norm, dead


def _inverse(A: torch.Tensor, name: str) -> torch.Tensor:
    L, info = torch.linalg.cholesky_ex(A)
    if info.item():
        raise SolverError(f"layer {name}: ADMM system is not positive definite")
    return torch.cholesky_inverse(L)


def _gradual_drop(score: torch.Tensor, share: float, full: float, n: int, m: int) -> torch.Tensor:
    """The weights to drop at ``share`` (0..1) of the way to the target: N:M, in each row the ``share`` of its N:M
    candidates with the smallest ``score``; unstructured, ``share * full`` of the matrix."""
    if not n:
        return _choose_unstructured(score, round(share * full * score.numel()))
    cand = _choose_nm(score, n, m)
    per_row = score.shape[1] * (m - n) // m
    k = round(share * per_row)
    if k >= per_row:
        return cand
    if k <= 0:
        return torch.zeros_like(cand)
    s = torch.where(cand, score, torch.full_like(score, float("inf")))
    return cand & (s <= s.kthvalue(k, dim=1, keepdim=True).values)

