"""Least squares on a sparsity mask by ADMM (Boza, 2024), the mask fixed or chosen gradually."""
from __future__ import annotations

from typing import Optional

import torch

from .errors import SolverError
from .obs import _choose_nm, _choose_unstructured, _smallest


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Least squares on a sparsity mask by ADMM (Boza 2024): ``min (W' - W) H (W' - W)^T`` with W' zero on the mask.

    With ``mask`` (True = pruned) given, the mask stays fixed. Otherwise it is chosen gradually: over the first
    ``mask_steps`` of the ``iters`` iterations the sparsity grows cubically to its target, each step pruning the
    weights of smallest OBS saliency ``|W + U| / sqrt([H^-1]_jj)`` (N:M: among the weights the N:M rule would drop,
    so the last step is exactly N:M). The problem is solved in coordinates scaled by ``sqrt(diag H)``, with
    ``damp * mean(diag)`` added to the Hessian and one ``(H + rho I)^-1`` for all iterations.
    Returns ``(weight [rows, cols] float32 with exact zeros on the mask, mask)``.
    """
    rows, cols = W.shape
    if n and cols % m:
        raise SolverError(f"layer {name}: {cols} input columns are not a multiple of M={m} for the {n}:{m} pattern")
    if mask is None and mask_steps < 1:
        raise SolverError(f"layer {name}: ADMM needs a mask or mask_steps >= 1")
    Hn, Wn, norm, dead = _scaled(W, H, damp)
    target = Wn.matmul(Hn)
    A = Hn.clone()
    A.diagonal().add_(rho)
    Ainv = _inverse(A, name)
    # OBS saliency in the scaled coordinates: |w| / sqrt([H^-1]_jj)
    obs_scale = torch.diag(_inverse(Hn, name)).clamp(min=1e-30).rsqrt()[None, :] if mask is None else None
    keep = None if mask is None else ~mask.to(W.device, torch.bool)
    full = (1.0 - n / m) if n else sparsity
    X, U = Wn.clone(), torch.zeros_like(Wn)
    for t in range(iters):
        if mask is None and t < mask_steps:
            keep = ~_gradual_drop((X + U).abs() * obs_scale, full * (1.0 - (1.0 - (t + 1) / mask_steps) ** 3), n, m)
        Z = (X + U) * keep
        U = U + X - Z
        X = (target + rho * (Z - U)).matmul(Ainv)
    Z = (X + U) * keep
    out = (Z / norm[None, :]).to(torch.float32)
    out[:, dead] = 0.0
    return out, ~keep


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


def _gradual_drop(score: torch.Tensor, share: float, n: int, m: int) -> torch.Tensor:
    """The ``share`` of the weights of smallest ``score`` (N:M: among those the N:M rule would drop)."""
    k = round(share * score.numel())
    if not n:
        return _choose_unstructured(score, k)
    cand = _choose_nm(score, n, m)
    drop = torch.zeros_like(cand)
    drop[cand] = _smallest(score[cand], k)
    return drop
