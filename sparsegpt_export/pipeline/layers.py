"""Solving the layers of one block: one layer, a group of layers that share an input (stacked into one sweep when
their solve is row by row and alike), and the record and report row each solved layer leaves."""
from __future__ import annotations

import contextlib
import logging
import time
import warnings
from typing import Any

import torch
from torch import nn

from .. import hostmem
from ..anatomy import get_weight, set_weight
from ..records import LayerRecord
from ..solver import SolveResult, SolverError, measure_error, row_separable, solve_layer
from .sharing import solve_rows, solve_shared
from .state import RunState

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def one_thread():
    """Solves run on one CPU thread: the BLAS rounds a product otherwise with 2 threads than with 1, and the sweep
    amplifies that into other masks (SmolLM2: one process on 2 threads kept 92.7% of the masks of the same process on
    1 thread, which torchrun's ranks get), so a layer's solve must not depend on the process's thread count. The
    block forwards and the Hessians keep every thread (nothing else runs while a layer is solved); a solve uses
    them for its matrix products, as slices of rows, each on one BLAS thread (`solver.solve_layer`)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def solve_one(state: RunState, lname: str, module: nn.Module, H: torch.Tensor, prune: bool = True,
              split: Any = None) -> None:
    """Solve one layer; with ``split`` (the ranks), this rank solves its share of the rows and the shares are
    exchanged (only for row-separable problems: see ``solver.row_separable``)."""
    with one_thread():
        _solve_one(state, lname, module, H, prune, split)


def _solve_one(state: RunState, lname: str, module: nn.Module, H: torch.Tensor, prune: bool, split: Any) -> None:
    W = get_weight(module)
    rows, cols = W.shape
    t0 = time.perf_counter()
    pattern, task = state.task(lname, prune)
    if task.prune and task.n and cols % task.m:
        if state.config.on_incompatible == "error":
            raise SolverError(f"layer {lname}: {cols} input columns are not a multiple of M={task.m} for the {pattern} "
                              "pattern")
        msg = f"layer {lname}: {cols} input columns are not a multiple of M={task.m}; left dense"
        warnings.warn(msg)
        state.rows.append({"layer": lname, "pattern": "skipped", "warning": msg, "shape": [rows, cols]})
        return
    Wd = W.to(state.device)
    if split is not None:
        res, extra = solve_rows(state, split, lname, Wd, H, task)
    else:
        res, extra = solve_layer(Wd, H, task, state.opts, name=lname)
    record(state, lname, module, res, extra, pattern, task.prune, t0)


def solve_stacked(state: RunState, members: list[tuple[str, nn.Module]], H: torch.Tensor, prune: bool = True) -> None:
    """Layers that share one input (q/k/v, gate/up): when their solve is row by row and alike (same pattern,
    sparsity and columns), one sweep over their rows stacked, which gives each row what its own layer's sweep
    would (N:M masks, grids and the OBS update are per row) in fewer column steps; else one by one."""
    setups = [state.task(name, prune) for name, _ in members]
    weights = [get_weight(mod) for _, mod in members]
    pattern, task = setups[0]
    alike = len(members) > 1 and len(set(setups)) == 1 and len({w.shape[1] for w in weights}) == 1
    if not (alike and state.config.stack_shared_inputs and row_separable(state.opts, [t for _, t in setups])
            and not (task.prune and task.n and weights[0].shape[1] % task.m)):
        for name, mod in members:
            solve_one(state, name, mod, H, prune)
        return
    t0 = time.perf_counter()
    res, extra = solve_layer(torch.cat([w.to(state.device) for w in weights]), H, task, state.opts,
                             name=members[0][0], measure=False)
    del weights
    each = (time.perf_counter() - t0) / len(members)
    lo = 0
    for name, mod in members:
        part = _rows_of(res, lo, get_weight(mod).shape[0])
        W0 = get_weight(mod).to(state.device)
        part.error, part.norm = measure_error(part.weight, W0, H, state.opts.workers)
        part.rel_error = part.error / part.norm if part.norm > 0 else 0.0
        del W0
        record(state, name, mod, part, {**extra, "stacked_with": [n for n, _ in members if n != name]}, pattern,
               task.prune, time.perf_counter() - each)
        lo += part.weight.shape[0]


def _rows_of(res: SolveResult, lo: int, r: int) -> SolveResult:
    return SolveResult(weight=res.weight[lo:lo + r], mask=res.mask[lo:lo + r],
                       scales=res.scales[lo:lo + r] if res.scales is not None else None,
                       zeros=res.zeros[lo:lo + r] if res.zeros is not None else None,
                       damp=res.damp, damp_escalations=res.damp_escalations, dead_inputs=res.dead_inputs)


def record(state: RunState, lname: str, module: nn.Module, res: SolveResult, extra: dict, pattern: str, prune: bool,
           t0: float) -> None:
    """Write the solved weight into the module, and keep its record and report row."""
    rows, cols = res.weight.shape
    config = state.config
    set_weight(module, res.weight)
    if state.store is not None:  # --offload disk: give the solve's freed scratch back now (it would pile up until
        hostmem.trim()           # the block ends, in heap holes that glibc returns only when trimmed)
    pattern = pattern if prune else "dense"
    achieved = res.mask.float().mean().item()
    quantized = state.opts.quant is not None
    state.records[lname] = LayerRecord(
        name=lname, shape=(rows, cols), pattern=pattern, sparsity=achieved, bits=config.bits,
        group_size=(config.group_size if config.group_size and config.group_size < cols else None) if quantized else None,
        sym=config.sym,
        scales=res.scales.to(state.scale_dtype).cpu() if res.scales is not None else None,
        zeros=res.zeros.to(torch.uint8).cpu() if (res.zeros is not None and not config.sym) else None,
    )
    if lname in state.plan["scores"]:
        extra["score"] = state.plan["scores"][lname]
    if lname in state.plan["sparsity"]:
        extra["allocated_sparsity"] = round(state.plan["sparsity"][lname], 6)
    state.rows.append({
        "layer": lname, "shape": [rows, cols], "pattern": pattern, "sparsity": round(achieved, 6),
        "bits": config.bits, "group_size": config.group_size if quantized else None,
        "rel_error": res.rel_error, "damp": res.damp, "damp_escalations": res.damp_escalations,
        "dead_inputs": res.dead_inputs, "time_s": round(time.perf_counter() - t0, 4), **extra,
    })
    if res.damp_escalations:
        logger.warning("layer %s: Cholesky failed, damping raised to %g", lname, res.damp)
    state.time("solve_s", time.perf_counter() - t0)


def solve_group(state: RunState, members: list[tuple[str, nn.Module]], H: torch.Tensor, prune: bool = True) -> None:
    """Solve layers that share one input ``H`` (already summed over the ranks). With several ranks each rank solves
    its share (`pipeline.sharing`); alone, `solve_stacked`."""
    with one_thread():
        if state.dist is None:
            solve_stacked(state, members, H, prune)
        else:
            solve_shared(state, members, H, prune, solve_one)
