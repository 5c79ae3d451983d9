"""The weight update of one layer, behind one interface: ``solve_layer(W, H, task, options)``.

- ``obs``: SparseGPT's sweep (`solver.obs`). With quantization and ``quant_order="after-mask"`` the mask and the
  OBS update come first, unquantized; a second sweep then quantizes the kept weights on that fixed mask.
- ``admm``: least squares on the mask by ADMM (`solver.admm`), the mask chosen during the iterations (or the
  SparseGPT sweep's mask, its weights the starting point); with quantization a sweep then quantizes the ADMM
  weights with the mask fixed.
- ``auto`` (the default): ``admm`` for N:M patterns, ``obs`` for unstructured ones.

A new strategy is one class with ``solve(W, H, task, options, name, measure)`` registered in ``UPDATES``.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, Optional

import torch

from ..quant import QuantSpec
from .admm import admm_prune, row_slices
from .columns import scripted
from .obs import SolveResult, kernel_sweep, layer_error, measure_error, sparsegpt_solve

SLICE_ROWS = 128  # the fewest rows of a slice solved on a thread of its own


@dataclass(frozen=True)
class LayerTask:
    """What one weight matrix gets: pruned (N:M when ``n``, else unstructured at ``sparsity``) or not."""

    prune: bool
    n: int = 0
    m: int = 0
    sparsity: float = 0.0


@dataclass(frozen=True)
class SolveOptions:
    """The solver settings of a run (from `SparseGPTConfig`)."""

    quant: Optional[QuantSpec] = None
    update: str = "obs"
    quant_order: str = "after-mask"
    saliency: str = "obs"
    blocksize: int = 128
    mask_blocksize: int = 128
    damp: float = 0.01
    fit_scales_to_kept: bool = True
    refit_scales: bool = True
    refine_steps: int = 40
    admm_mask: str = "gradual"
    workers: int = field(default=1, compare=False)  # threads for row slices (ADMM, the products after a sweep); the
    # result does not depend on it
    sweep: str = "auto"  # the column sweep's blocks: "torch", "triton" (one kernel per block), "auto" (the kernel on CUDA)
    extra: dict = field(default_factory=dict, compare=False)

    def update_for(self, task: LayerTask) -> str:
        """The update this layer takes: a layer that is not pruned always takes the sweep (quantization alone is
        GPTQ); ``auto`` is ADMM for N:M masks and the sweep for unstructured ones."""
        if not task.prune:
            return "obs"
        if self.update == "auto":
            return "admm" if task.n else "obs"
        return self.update

    def sweep_kwargs(self, name: str) -> dict[str, Any]:
        return dict(quant=self.quant, blocksize=self.blocksize, mask_blocksize=self.mask_blocksize, damp=self.damp,
                    fit_scales_to_kept=self.fit_scales_to_kept, refit_scales=self.refit_scales, name=name,
                    workers=self.workers, sweep=self.sweep)


class ObsUpdate:
    """SparseGPT's column sweep (the mask chosen, the error spread by the OBS update)."""

    def solve(self, W: torch.Tensor, H: torch.Tensor, task: LayerTask, opts: SolveOptions, name: str,
              measure: bool = True) -> tuple[SolveResult, dict]:
        common = opts.sweep_kwargs(name)
        if not (task.prune and opts.quant is not None and opts.quant_order == "after-mask"):
            return sparsegpt_solve(W, H, sparsity=task.sparsity, n=task.n, m=task.m, saliency=opts.saliency,
                                   measure=measure, **common), {}
        # the mask and the OBS update first, unquantized; then the kept weights quantized on that mask
        pruned = sparsegpt_solve(W, H, sparsity=task.sparsity, n=task.n, m=task.m, saliency=opts.saliency,
                                 measure=False, **{**common, "quant": None, "refit_scales": False})
        out = sparsegpt_solve(pruned.weight, H, mask=pruned.mask, factor=pruned.factor, **common)
        pruned.factor = out.factor = None
        if measure:  # against the weights before both sweeps
            out.error, out.norm = measure_error(out.weight, W, H, opts.workers)
            out.rel_error = out.error / out.norm if out.norm > 0 else 0.0
        out.damp, out.damp_escalations = pruned.damp, pruned.damp_escalations
        return out, {}


class AdmmUpdate:
    """Least squares on the mask by ADMM: the mask chosen gradually during the iterations, or (``admm_mask="obs"``)
    the SparseGPT sweep's mask with its weights as the starting point (never worse than them)."""

    def solve(self, W: torch.Tensor, H: torch.Tensor, task: LayerTask, opts: SolveOptions, name: str,
              measure: bool = True) -> tuple[SolveResult, dict]:
        common = opts.sweep_kwargs(name)
        steps = opts.refine_steps
        obs, extra = None, {}
        if opts.admm_mask == "obs":
            obs = sparsegpt_solve(W, H, sparsity=task.sparsity, n=task.n, m=task.m, saliency=opts.saliency,
                                  measure=measure, **{**common, "quant": None, "refit_scales": False})
        Wa, mask = admm_prune(W, H, sparsity=task.sparsity, n=task.n, m=task.m, iters=steps, damp=opts.damp,
                              mask_steps=max(1, (3 * steps) // 4), name=name, workers=opts.workers,
                              mask=None if obs is None else obs.mask, init=None if obs is None else obs.weight)
        admm_err = layer_error(Wa, W.float(), H, opts.workers) if measure else 0.0
        if measure:
            extra["admm_rel_error"] = admm_err
        if obs is not None and measure:
            extra.update(obs_rel_error=obs.rel_error,
                         admm_error_reduction=(1.0 - admm_err / obs.rel_error) if obs.rel_error > 0 else 0.0)
        if opts.quant is not None:
            res = sparsegpt_solve(Wa, H, mask=mask, measure=False, **common)
        else:
            res = SolveResult(weight=Wa, mask=mask, dead_inputs=int((torch.diag(H) <= 0).sum()))
        # against the weights before the update (rows add up: what ranks sum when they split the rows)
        res.error, res.norm = measure_error(res.weight, W, H, opts.workers) if measure else (0.0, 0.0)
        res.rel_error = res.error / res.norm if res.norm > 0 else 0.0
        res.damp = opts.damp
        return res, extra


UPDATES = {"obs": ObsUpdate(), "admm": AdmmUpdate()}


def solve_layer(W: torch.Tensor, H: torch.Tensor, task: LayerTask, opts: SolveOptions, *, name: str = "",
                measure: bool = True) -> tuple[SolveResult, dict]:
    """The compressed weight of one matrix (or of stacked matrices sharing ``H``) and the update's extra report
    fields (`SolveOptions.update_for` picks the update). A row-by-row problem is solved in slices of rows on
    ``opts.workers`` threads (each slice gives what the whole solve gives its rows), when the sweep's column steps
    run as TorchScript (`solver.columns`: in Python, the threads would only take turns at the interpreter); the
    per-layer comparison fields of ``admm_mask="obs"`` keep it whole. Else ``opts.workers`` threads share the
    matrix products (ADMM's iterations, the products after a sweep)."""
    kind = opts.update_for(task)
    threads = scripted() is not None and not kernel_sweep(opts.sweep, W.device, name)  # (triton's interpreter: one)
    slices = row_slices(W.shape[0], opts.workers, least=SLICE_ROWS) if threads else [slice(None)]
    if len(slices) == 1 or not row_separable(opts, [task]) or (kind == "admm" and opts.admm_mask == "obs"):
        return UPDATES[kind].solve(W, H, task, opts, name, measure)
    with ThreadPoolExecutor(len(slices)) as pool:
        parts = list(pool.map(partial(_solve_rows, W, H, task, replace(opts, workers=1), name, kind), slices))
    res = _concat_rows(parts)
    if measure:
        res.error, res.norm = measure_error(res.weight, W, H, opts.workers)
        res.rel_error = res.error / res.norm if res.norm > 0 else 0.0
    return res, {"row_slices": len(slices)}


def _solve_rows(W, H, task: LayerTask, opts: SolveOptions, name: str, kind: str, rows: slice) -> SolveResult:
    return UPDATES[kind].solve(W[rows], H, task, opts, name, False)[0]


def _concat_rows(parts: list[SolveResult]) -> SolveResult:
    first = parts[0]
    return SolveResult(
        weight=torch.cat([p.weight for p in parts]), mask=torch.cat([p.mask for p in parts]),
        scales=torch.cat([p.scales for p in parts]) if first.scales is not None else None,
        zeros=torch.cat([p.zeros for p in parts]) if first.zeros is not None else None,
        damp=max(p.damp for p in parts), damp_escalations=max(p.damp_escalations for p in parts),
        seconds=max(p.seconds for p in parts), dead_inputs=first.dead_inputs)


def row_separable(opts: SolveOptions, tasks: list[LayerTask]) -> bool:
    """Whether solving these layers is row by row (N:M masks, or no pruning, with either update): then a share of
    the rows solved alone gives what the whole matrix's solve gives those rows. Unstructured masks rank the
    weights of all rows together."""
    return all(not t.prune or t.n > 0 for t in tasks)
