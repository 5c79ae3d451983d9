"""The report of a run (``sparsegpt_report.json``): per layer rows, a summary, the time profile, warnings."""
from __future__ import annotations

import time
from typing import Any

from .. import smoothing
from .state import RunState


def build_report(state: RunState, *, nsamples: int, seqlen: int, batch: int, spill: bool, smoothed: list[dict],
                 t_start: float) -> dict[str, Any]:
    config, rows, plan = state.config, state.rows, state.plan
    pruned = [r for r in rows if r.get("pattern") not in ("skipped",)]
    # the sparsity is the pruned layers' (a quantized-only lm_head does not dilute it; layers kept dense by
    # dense_fraction do count, with sparsity 0)
    sparse_rows = [r for r in pruned if r["pattern"] != "dense" or not config.prunes or r["layer"] in plan["pattern"]]
    total_w = sum(r["shape"][0] * r["shape"][1] for r in sparse_rows)
    report = {
        "model": state.model_name, "config": config.to_dict(), "blocks_path": state.path,
        "num_blocks": len(state.blocks), "nsamples": int(nsamples), "world_size": state.dist.world if state.dist else 1,
        "seqlen": int(seqlen), "calib_batch_size": int(batch), "hessian_group_windows": state.hessian_group, "activations": "host" if spill else "device",
        "offload": "disk" if state.store is not None else None, "device": str(state.device),
        "scale_dtype": str(state.scale_dtype).replace("torch.", ""), "layers": rows,
        "summary": {
            "layers_compressed": len(pruned),
            "layers_skipped": len(rows) - len(pruned),
            "weighted_sparsity": (sum(r["sparsity"] * r["shape"][0] * r["shape"][1] for r in sparse_rows) / total_w)
            if total_w else 0.0,
            "mean_rel_error": (sum(r["rel_error"] for r in pruned) / len(pruned)) if pruned else 0.0,
            "wall_s": round(time.perf_counter() - t_start, 3),
        },
        "profile": {k: round(v, 3) for k, v in state.prof.items()},
        "warnings": [r["warning"] for r in rows if "warning" in r] + plan["notes"],
    }
    if state.smooth_alpha or smoothed:
        report["smoothing"] = {"alpha": state.smooth_alpha, "auto": config.smooth_alpha is None,
                               "windows": smoothing.WINDOWS, "blocks": smoothed}
        if config.quantize_lm_head:
            report["smoothing"]["lm_head_alpha"] = config.lm_head_smoothing(state.smooth_alpha)
    if plan["method"]:
        report["allocation"] = {k: plan.get(k) for k in ("method", "sensitivity", "cache", "notes", "dense", "mixed")}
    if state.reconstructed:
        report["reconstruction"] = {"steps": state.config.reconstruct_steps, "lr": state.config.reconstruct_lr,
                                    "batch": state.config.reconstruct_batch, "blocks": state.reconstructed}
    done = [r for r in rows if "admm_error_reduction" in r]
    if done:
        report["summary"]["admm_error_reduction_mean"] = (
            sum(r["admm_error_reduction"] for r in done) / len(done)) if done else 0.0
    return report
