"""Several ranks (torchrun): the layers of a group shared out, or one layer's rows, and every result sent to every
rank so that all of them hold the same weights and records."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .. import distributed as distmod
from ..anatomy import get_weight
from ..records import LayerRecord
from ..solver import LayerTask, SolveResult, row_separable, solve_layer
from .state import RunState


def solve_shared(state: RunState, members: list[tuple[str, nn.Module]], H: torch.Tensor, prune: bool,
                 solve_one: Callable) -> None:
    """Each rank solves its share of the layers (largest first onto the least loaded rank), and every result is
    broadcast from the rank that solved it. When the layers do not share out evenly (one o_proj, or q/k/v on two
    ranks) and the solve is row by row, every rank solves its rows of each layer instead. ``solve_one`` is
    `layers.solve_one`."""
    d = state.dist
    names = [name for name, _ in members]
    shapes = [tuple(get_weight(mod).shape) for _, mod in members]
    sizes = [r * c * c for r, c in shapes]
    own = distmod.owners(names, sizes, d.world)
    busiest = max(sum(sz for sz, o in zip(sizes, own) if o == r) for r in range(d.world))
    if row_separable(state.opts, [state.task(n, prune)[1] for n in names]) and min(r for r, _ in shapes) >= 8 * d.world \
            and busiest * d.world > 1.2 * sum(sizes):
        for name, mod in members:
            solve_one(state, name, mod, H, prune, split=d)
        return
    for (name, mod), r in zip(members, own):
        if r == d.rank:
            solve_one(state, name, mod, H, prune)
    got = [share_result(state, r, name, mod) for (name, mod), r in zip(members, own)]
    state.rows[:] = [x for x in state.rows if x.get("layer") not in set(names)] + got


def solve_rows(state: RunState, d: "distmod.Dist", lname: str, W: torch.Tensor, H: torch.Tensor,
               task: LayerTask) -> tuple[SolveResult, dict]:
    """This rank's share of the rows of one layer solved, then the whole layer gathered from every rank's share."""
    rows, cols = W.shape
    lo, hi = distmod.row_range(rows, d)
    part, _ = solve_layer(W[lo:hi], H, task, state.opts, name=lname)
    return gather_rows(d, part, rows, cols), {"row_split_ranks": d.world}


def gather_rows(d: "distmod.Dist", part: SolveResult, rows: int, cols: int) -> SolveResult:
    """The whole layer's result from every rank's share of its rows (broadcast share by share, in rank order)."""
    weights, masks, scales, zeros = [], [], [], []
    err = torch.tensor([part.error, part.norm], dtype=torch.float64)
    total = distmod.all_reduce_sum(d, err)
    for r in range(d.world):
        lo, hi = distmod.row_range(rows, distmod.Dist(r, d.world, d.device))
        mine = r == d.rank
        weights.append(distmod.broadcast_tensor(d, part.weight if mine else torch.empty(hi - lo, cols), r))
        masks.append(distmod.broadcast_tensor(
            d, part.mask.to(torch.uint8) if mine else torch.empty(hi - lo, cols, dtype=torch.uint8), r).bool())
        if part.scales is not None:
            g = part.scales.shape[1]
            scales.append(distmod.broadcast_tensor(d, part.scales if mine else torch.empty(hi - lo, g), r))
            zeros.append(distmod.broadcast_tensor(d, part.zeros if mine else torch.empty(hi - lo, g), r))
    num, den = float(total[0]), float(total[1])
    return SolveResult(
        weight=torch.cat(weights).to(part.weight.device), mask=torch.cat(masks).to(part.mask.device),
        scales=torch.cat(scales) if scales else None, zeros=torch.cat(zeros) if zeros else None,
        damp=part.damp, damp_escalations=part.damp_escalations, rel_error=num / den if den > 0 else 0.0,
        seconds=part.seconds, dead_inputs=part.dead_inputs, error=num, norm=den)


def share_result(state: RunState, src: int, lname: str, module: nn.Module) -> dict:
    """Broadcast one solved layer (weight, record with scales and zeros, report row) from rank ``src``; every rank
    ends with the same weight and record. Returns the row."""
    d = state.dist
    mine = d.rank == src
    rec = state.records.get(lname) if mine else None
    meta = None
    if mine:
        meta = {"row": next(x for x in reversed(state.rows) if x.get("layer") == lname),
                "record": None if rec is None else {
                    "meta": rec.meta(),
                    "scales": None if rec.scales is None else [list(rec.scales.shape), str(rec.scales.dtype)[6:]],
                    "zeros": None if rec.zeros is None else list(rec.zeros.shape)}}
    meta = distmod.broadcast_json(d, meta, src)
    w = module.weight.data
    got = distmod.broadcast_tensor(d, w.float() if d.device.type == "cpu" else w, src)
    if not mine:
        w.copy_(got.to(w.dtype))
    r = meta["record"]
    if r is not None:
        scales = zeros = None
        if r["scales"] is not None:
            shape, dtype = r["scales"]
            buf = rec.scales.float() if mine else torch.empty(shape, dtype=torch.float32)
            scales = distmod.broadcast_tensor(d, buf, src).to(getattr(torch, dtype))
        if r["zeros"] is not None:
            buf = rec.zeros if mine else torch.empty(r["zeros"], dtype=torch.uint8)
            zeros = distmod.broadcast_tensor(d, buf, src)
        if not mine:
            state.records[lname] = LayerRecord.from_meta(lname, r["meta"], scales, zeros)
    return meta["row"]
