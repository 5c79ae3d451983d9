"""Per-layer sparsity: how sensitive each weight matrix is, and how the target sparsity is shared out.

Scores (one float per prunable weight matrix, higher = more sensitive):

- ``hutchinson``: the trace of the loss Hessian restricted to the matrix (Shao et al., 2023), estimated as the
  mean of ``v^T (H v)`` over Rademacher probes ``v``, ``H v`` by double backward through the whole model, each
  probe on its own calibration window;
- ``fisher``: the trace of the diagonal empirical Fisher, the sum of squared gradients (one backward per window);
- ``obd``: the mean Optimal-Brain-Damage saliency of the matrix's weights, ``mean_i F_ii w_i^2`` with ``F`` that
  diagonal Fisher: what removing one of its weights costs on average (per weight, so matrices of different sizes
  compare; the same backward passes as ``fisher``);
- ``proxy``: ``trace(H_layer) * ||W||^2`` with ``H_layer = 2 X^T X / n`` from a dense forward pass (no backward).

Allocations (``allocate``): ``uniform``; ``sensitivity`` gives density linearly in rank between
``L = 1 - p - alpha`` (least sensitive) and ``R = 2 (1 - p) - L``; ``owl`` (Yin et al., 2023) gives each block a
density from its outlier ratio (the share of ``|W| * ||x_col||`` above ``M`` times the block mean), scaled to
``[-lambda, +lambda]`` around ``1 - p``. Every allocation is then shifted so that the average sparsity weighted by
parameters equals the target, each matrix clipped to ``[0, 0.99]``.

The driver only needs ``allocate``'s result; this module imports no file format.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from .anatomy import get_weight
from .config import ALLOCATIONS, METHODS  # the choices live with the config

logger = logging.getLogger(__name__)

MAX_SPARSITY = 0.99


class SensitivityError(ValueError):
    """Bad input to the sensitivity estimate or the allocation; the message names the option."""


# ---------------------------------------------------------------------------------------------- statistics
@torch.no_grad()
def input_statistics(model: nn.Module, names: list[str], calib: torch.Tensor, batch: int = 8,
                     device: Optional[torch.device] = None, progress: bool = False) -> dict[str, torch.Tensor]:
    """Mean of ``x_j^2`` over the calibration tokens for every input column ``j`` of each named linear layer, from
    one dense forward pass (OWL's ``||X_j||^2 / n`` and the proxy's ``trace(H) = 2 * sum_j``)."""
    modules = dict(model.named_modules())
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    handles = []
    for name in names:
        def hook(_mod, args, name=name):
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            sums[name] = sums.get(name, 0) + (x * x).sum(dim=0).cpu()
            counts[name] = counts.get(name, 0) + x.shape[0]
        handles.append(modules[name].register_forward_pre_hook(hook))
    dev = device or next(model.parameters()).device
    try:
        it = range(0, calib.shape[0], batch)
        if progress:
            from tqdm.auto import tqdm

            it = tqdm(it, desc="input statistics", unit="batch")
        for i in it:
            model(input_ids=calib[i:i + batch].to(dev), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {k: sums[k] / counts[k] for k in sums}


def _loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, labels=ids, use_cache=False).loss


def estimate(model: nn.Module, names: list[str], calib: torch.Tensor, *, method: str = "hutchinson",
             probes: int = 32, seed: int = 0, device: Optional[torch.device] = None, progress: bool = False,
             stats: Optional[dict[str, torch.Tensor]] = None) -> dict[str, float]:
    """Sensitivity score of each named weight matrix (see the module docstring for ``method``).

    ``hutchinson`` and ``fisher`` use one calibration window per probe (cycling through ``calib``), so the estimate
    averages over the data as well as over the probes; ``probes`` windows of at least 2 tokens are needed.
    """
    if method not in METHODS:
        raise SensitivityError(f"sensitivity: {method!r} is not one of {METHODS}")
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise SensitivityError(f"sensitivity: no module named {missing[0]!r} in {type(model).__name__}")
    if method == "proxy":
        stats = stats if stats is not None else input_statistics(model, names, calib, device=device, progress=progress)
        return {n: float(2.0 * stats[n].sum() * get_weight(modules[n]).float().pow(2).sum()) for n in names}
    if probes < 1:
        raise SensitivityError(f"probes: {probes!r} must be a positive integer")
    if calib.dim() != 2 or calib.shape[1] < 2 or calib.shape[0] < 1:
        raise SensitivityError(
            f"sensitivity: {method} needs calibration windows of at least 2 tokens (got {tuple(calib.shape)})")
    dev = device or next(model.parameters()).device
    params = [modules[n].weight for n in names]
    was = [p.requires_grad for p in model.parameters()]
    training = model.training
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    gen = torch.Generator().manual_seed(seed)
    totals = [0.0] * len(names)
    it = range(probes)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc=f"sensitivity ({method})", unit="probe")
    from torch.nn.attention import SDPBackend, sdpa_kernel

    try:
        # the math attention is differentiable twice; the fused CPU/CUDA kernels are not
        ctx = sdpa_kernel([SDPBackend.MATH]) if method == "hutchinson" else _nullcontext()
        with ctx:
            _probe_loop(model, params, calib, it, method, dev, gen, totals)
    finally:
        for p, w in zip(model.parameters(), was):
            p.requires_grad_(w)
        model.train(training)
    return {n: t / probes for n, t in zip(names, totals)}


def _nullcontext():
    import contextlib

    return contextlib.nullcontext()


def _probe_loop(model, params, calib, it, method, dev, gen, totals) -> None:
    for k in it:
        ids = calib[k % calib.shape[0]:k % calib.shape[0] + 1].to(dev)
        if method in ("fisher", "obd"):
            grads = torch.autograd.grad(_loss(model, ids), params)
            for i, (g, p) in enumerate(zip(grads, params)):
                if method == "fisher":
                    totals[i] += float(g.float().pow(2).sum())
                else:
                    totals[i] += float((g.float() * p.detach().float()).pow(2).mean())
            continue
        grads = torch.autograd.grad(_loss(model, ids), params, create_graph=True)
        vs = [(torch.randint(0, 2, p.shape, generator=gen, dtype=torch.int8) * 2 - 1).to(p.device, p.dtype)
              for p in params]
        hv = torch.autograd.grad(sum((g * v).sum() for g, v in zip(grads, vs)), params)
        for i, (h, v) in enumerate(zip(hv, vs)):
            totals[i] += float((h * v).float().sum())


# ---------------------------------------------------------------------------------------------- the cache
def model_signature(model: nn.Module, names: list[str], model_name: str = "") -> str:
    """Identifies the model for the cache: its name and class, the name and shape of every scored matrix, and a
    fingerprint of the first matrix's values (two checkpoints of one architecture differ there)."""
    modules = dict(model.named_modules())
    first = modules[names[0]].weight.detach().reshape(-1)[:4096].float().cpu().numpy().tobytes() if names else b""
    text = (f"{model_name}|{type(model).__name__}|" + ";".join(f"{n}:{tuple(modules[n].weight.shape)}" for n in names)
            + "|" + hashlib.sha256(first).hexdigest())
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cached_scores(path: Path, signature: str, method: str, probes: int, seed: int, calib_hash: str,
                  compute: Callable[[], dict[str, float]]) -> tuple[dict[str, float], str]:
    """Scores from ``path`` when it was written for this model, method, probes, seed and calibration data; else
    computed and written there. Returns ``(scores, what happened)`` for the log."""
    key = {"signature": signature, "method": method, "probes": probes if method != "proxy" else None,
           "seed": seed, "calibration": calib_hash}
    if path.exists():
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError:
            data = {}
        if data.get("key") == key:
            return {k: float(v) for k, v in data["scores"].items()}, f"reused the sensitivity scores in {path}"
        why = ("another model" if data.get("key", {}).get("signature") != signature
               else "another method, probe count, seed or calibration set")
        note = f"the sensitivity cache {path} was made for {why}: recomputed"
    else:
        note = f"sensitivity scores written to {path}"
    scores = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps({"key": key, "scores": scores}, indent=1, sort_keys=True))
    tmp.replace(path)
    return scores, note


# ---------------------------------------------------------------------------------------------- allocation
def outlier_ratio(weights: list[torch.Tensor], col_sq: list[torch.Tensor], m: float = 5.0) -> float:
    """OWL's layerwise outlier distribution of one block: the share of ``|W_ij| * ||x_j||`` above ``m`` times the
    mean of that score over all the block's matrices."""
    scores = [w.abs().float() * s.float().sqrt().reshape(1, -1) for w, s in zip(weights, col_sq)]
    flat = torch.cat([s.flatten() for s in scores])
    return float((flat > m * flat.mean()).float().mean())


def balance(density: dict[str, float], numel: dict[str, int], target_density: float,
            lo: float = 1.0 - MAX_SPARSITY, hi: float = 1.0) -> dict[str, float]:
    """Shift every density by one constant (each clipped to ``[lo, hi]``) so that the parameter-weighted mean is
    ``target_density``; bisection to 1e-12."""
    total = sum(numel.values())

    def mean(c):
        return sum(numel[k] * min(hi, max(lo, d + c)) for k, d in density.items()) / total

    a, b = -2.0, 2.0
    for _ in range(200):
        c = (a + b) / 2
        if mean(c) < target_density:
            a = c
        else:
            b = c
    c = (a + b) / 2
    return {k: min(hi, max(lo, d + c)) for k, d in density.items()}


def allocate(method: str, target: float, numel: dict[str, int], *, scores: Optional[dict[str, float]] = None,
             alpha: float = 0.1, blocks: Optional[dict[str, str]] = None, outliers: Optional[dict[str, float]] = None,
             owl_lambda: float = 0.08) -> tuple[dict[str, float], list[str]]:
    """Sparsity of each matrix (``numel``'s keys) for the target ``target``; returns ``(sparsities, notes)``.

    ``sensitivity`` needs ``scores``; ``owl`` needs ``blocks`` (matrix -> block name) and ``outliers`` (block ->
    outlier ratio). The parameter-weighted average sparsity equals ``target`` (to 1e-9 unless clipping makes it
    impossible, which raises) and each matrix's lies in ``[0, 0.99]``.
    """
    if method not in ALLOCATIONS:
        raise SensitivityError(f"allocation: {method!r} is not one of {ALLOCATIONS}")
    if not (0.0 <= target < 1.0):
        raise SensitivityError(f"sparsity: {target!r} must lie in [0, 1)")
    if target > MAX_SPARSITY:
        raise SensitivityError(f"sparsity: {target!r} is above the largest per-matrix sparsity {MAX_SPARSITY}")
    names = list(numel)
    notes: list[str] = []
    if method == "uniform" or len(names) < 2:
        return {k: target for k in names}, notes
    d0 = 1.0 - target
    if method == "sensitivity":
        if scores is None or any(k not in scores for k in names):
            missing = [k for k in names if not scores or k not in scores]
            raise SensitivityError(f"allocation sensitivity: no score for {missing[0]!r}")
        if alpha < 0:
            raise SensitivityError(f"alpha: {alpha!r} must be >= 0")
        lo_d, hi_d = d0 - alpha, 2 * d0 - (d0 - alpha)
        if lo_d < 1.0 - MAX_SPARSITY or hi_d > 1.0:
            notes.append(
                f"alpha={alpha:g} at sparsity {target:g} asks for densities in [{lo_d:.4f}, {hi_d:.4f}]: matrices are "
                f"clipped to sparsity [0, {MAX_SPARSITY}] and the rest shifted to keep the average")
        order = sorted(names, key=lambda k: (scores[k], k))  # least sensitive first: pruned most
        K = len(order)
        density = {k: lo_d + (hi_d - lo_d) * r / (K - 1) for r, k in enumerate(order)}
    else:
        if blocks is None or outliers is None:
            raise SensitivityError("allocation owl: needs each matrix's block and each block's outlier ratio")
        if owl_lambda < 0:
            raise SensitivityError(f"owl_lambda: {owl_lambda!r} must be >= 0")
        vals = [outliers[blocks[k]] for k in names]
        span = max(vals) - min(vals)
        block_d = {b: (2 * owl_lambda * (r - min(vals)) / span if span > 0 else owl_lambda) for b, r in outliers.items()}
        mean_d = sum(block_d.values()) / len(block_d)
        density = {k: block_d[blocks[k]] - mean_d + d0 for k in names}
        if min(density.values()) < 1.0 - MAX_SPARSITY or max(density.values()) > 1.0:
            notes.append(f"owl_lambda={owl_lambda:g} at sparsity {target:g} pushes blocks outside sparsity "
                         f"[0, {MAX_SPARSITY}]: clipped, the rest shifted to keep the average")
    density = balance(density, numel, d0)
    total = sum(numel.values())
    achieved = 1.0 - sum(numel[k] * density[k] for k in names) / total
    if abs(achieved - target) > 1e-6:
        raise SensitivityError(f"allocation {method}: cannot keep the average sparsity {target:g} within "
                               f"[0, {MAX_SPARSITY}] per matrix (reached {achieved:.6f})")
    return {k: 1.0 - density[k] for k in names}, notes


def nm_choice(scores: dict[str, float], fraction: float) -> list[str]:
    """The most sensitive ``fraction`` of the matrices (rounded to the nearest count), most sensitive first."""
    if not (0.0 <= fraction <= 1.0):
        raise SensitivityError(f"fraction: {fraction!r} must lie in [0, 1]")
    order = sorted(scores, key=lambda k: (-scores[k], k))
    return order[:int(math.floor(fraction * len(order) + 0.5))]


def block_of(name: str, blocks_path: str) -> str:
    """``model.layers.3.mlp.up_proj`` -> ``model.layers.3`` (the transformer block a matrix belongs to)."""
    m = re.match(re.escape(blocks_path) + r"\.(\d+)\.", name)
    return f"{blocks_path}.{m.group(1)}" if m else name
