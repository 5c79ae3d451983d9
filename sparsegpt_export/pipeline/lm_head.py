"""The lm_head, quantized (never pruned) after the blocks, its Hessian from the final norm's outputs on the
compressed blocks; with smoothing, the final norm -> lm_head pair smoothed first."""
from __future__ import annotations

import time
from typing import Optional

import torch
from torch import nn

from .. import smoothing
from ..anatomy import UnsupportedModelError, final_norm, untie_lm_head
from ..solver import HessianAccumulator
from .blockrun import complete_hessian
from .layers import solve_group
from .state import RunState


@torch.no_grad()
def quantize_lm_head(state: RunState, model: nn.Module, chunks) -> Optional[float]:
    """Returns the largest log2 smoothing factor of the pair, or None when it was not smoothed."""
    t = time.perf_counter()
    lm = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if lm is None or not isinstance(lm, nn.Linear):
        raise UnsupportedModelError(f"{type(model).__name__}: --quantize-lm-head: no nn.Linear output embedding (lm_head) found")
    norm, tail = final_norm(model)
    untie_lm_head(model)
    moved = [(m, next(m.parameters(), torch.empty(0)).device) for m in tail + [lm]]
    for mod, _ in moved:
        mod.to(state.device)
    factor = None
    alpha = state.config.lm_head_smoothing(state.smooth_alpha)
    try:
        if alpha and len(tail) == 1:
            factor = smoothing.smooth_head(norm, lm, (hs for hs, _ in chunks), alpha, d=state.dist)
        acc = HessianAccumulator(lm.in_features, device=state.device, dtype=state.hdtype, name="lm_head",
                                 group=state.hessian_group)
        for hs, _ in chunks:
            x = hs.to(state.device)
            for mod in tail:
                x = mod(x)
            acc.add(x, hs.shape[0])
        H = complete_hessian(state, acc)
        name = next(n for n, mod in model.named_modules() if mod is lm)
        solve_group(state, [(name, lm)], H, prune=False)
    finally:
        for mod, dev in moved:
            mod.to(dev)
    state.time("lm_head_s", time.perf_counter() - t)
    return factor
