"""gpu-check's compress row (issue #25): the README's compression (2:4 + 4-bit g128 sym, the default update) of a
random ~1B Llama built on the device in fp16, on random calibration tokens (128 x 2048 in the full plan), the whole
pass timed as a user runs it (``compress_model``, no progress bar), with the report's profile; and an ESTIMATE
(labelled so) of a ~8B model from the measured per-block times, each part scaled by its own work:

- block forwards and Hessians: by the block's linear weights (the tokens are the same);
- solves: by the sum of rows x cols^2 over the block's matrices (the sweep's and ADMM's work per matrix).

On a CPU (``--quick``) the same code runs a tiny model: a harness check, not a GPU figure.
"""
from __future__ import annotations

import gc
import time
from typing import Any

import torch


def _block_shapes(cfg: dict) -> list[tuple[int, int]]:
    """(rows, cols) of one Llama block's linear layers."""
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    kv = h // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    return [(h, h), (kv, h), (kv, h), (h, h), (i, h), (i, h), (h, i)]


def estimate(measured: dict, small: dict, large: dict) -> dict[str, Any]:
    """The ``large`` model's compress time from the ``small`` one's measured profile (per block, scaled by work)."""
    ps, pl = _block_shapes(small), _block_shapes(large)
    weights = sum(r * c for r, c in pl) / sum(r * c for r, c in ps)
    solve = sum(r * c * c for r, c in pl) / sum(r * c * c for r, c in ps)
    prof, blocks = measured["profile"], small["num_hidden_layers"]
    per_block = {"block_forward_s": prof["block_forward_s"] * weights / blocks,
                 "hessian_s": prof["hessian_s"] * weights / blocks,
                 "solve_s": prof["solve_s"] * solve / blocks}
    total = sum(per_block.values()) * large["num_hidden_layers"]
    return {"ESTIMATE": True, "blocks": large["num_hidden_layers"], "weights_ratio": round(weights, 2),
            "solve_ratio": round(solve, 2), "per_block_s": {k: round(v, 3) for k, v in per_block.items()},
            "compress_s": round(total, 1)}


def compress_row(device: str, name: str, cfg: dict, nsamples: int, seqlen: int, large: dict | None) -> dict:
    """Build the model on ``device``, compress it, time it; the ``large`` estimate beside it."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from sparsegpt_export.config import SparseGPTConfig
    from sparsegpt_export.pipeline import compress_model
    from sparsegpt_export.solver.obs import kernel_sweep

    torch.manual_seed(0)
    t0 = time.perf_counter()
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(LlamaConfig(**cfg, max_position_embeddings=max(4096, seqlen)),
                                                 dtype=torch.float16 if device.startswith("cuda") else torch.float32)
    model.eval()
    calib = torch.randint(0, cfg["vocab_size"], (nsamples, seqlen), generator=torch.Generator().manual_seed(0))
    build_s = time.perf_counter() - t0
    config = SparseGPTConfig(pattern="2:4", bits=4, group_size=128, device=device, nsamples=nsamples, seqlen=seqlen)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    res = compress_model(model, calib, config, progress=False)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    report = res.report
    row = {"model": name, "parameters": sum(p.numel() for p in model.parameters()), "build_s": round(build_s, 1),
           "tokens": [nsamples, seqlen], "compress_s": round(wall, 2), "blocks": cfg["num_hidden_layers"],
           "per_block_s": round(wall / cfg["num_hidden_layers"], 3), "update": report.get("update", config.update),
           "sweep": "triton kernel" if kernel_sweep(config.sweep, torch.device(device)) else "torch",
           "profile": {k: round(v, 3) for k, v in report["profile"].items()},
           "mean_rel_error": report["summary"]["mean_rel_error"], "layers": report["summary"]["layers_compressed"]}
    if device.startswith("cuda"):
        row["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    if large is not None:
        row["estimate_8B"] = estimate(row, cfg, large)
    del model, res
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return row


def compress_rows(device: str, plan: dict, deadline: float) -> list[dict]:
    """The plan's compress row, unless the budget is spent (a compress cannot be cut in the middle)."""
    if time.monotonic() > deadline:
        return [{"model": plan["model"], "skipped": "out of the time budget"}]
    try:
        return [compress_row(device, plan["model"], plan["config"], plan["nsamples"], plan["seqlen"],
                             plan.get("large"))]
    except Exception as e:  # the rest of the check goes on; the row says what failed
        return [{"model": plan["model"], "skipped": f"{type(e).__name__}: {e}"[:300]}]


def compress_table(res: dict) -> list[str]:
    lines = [f"compress on {res['env']['device_name']}: 2:4 + 4-bit g128 sym, the default update, random Llama and "
             "random calibration tokens, the whole `compress_model` pass", ""]
    for r in res.get("compress", []):
        if "skipped" in r:
            lines.append(f"{r['model']}: skipped: {r['skipped']}")
            continue
        p = r["profile"]
        lines.append(f"{r['model']} ({r['parameters'] / 1e6:.0f} M parameters, {r['tokens'][0]} x {r['tokens'][1]} "
                     f"tokens): **{r['compress_s']:.1f} s** ({r['per_block_s']:.2f} s per block; forwards "
                     f"{p.get('block_forward_s', 0):.1f} s, Hessians {p.get('hessian_s', 0):.1f} s, solves "
                     f"{p.get('solve_s', 0):.1f} s), mean layer error {r['mean_rel_error']:.4f}")
        if "estimate_8B" in r:
            e = r["estimate_8B"]
            lines.append(f"ESTIMATE for a ~8B Llama ({e['blocks']} blocks; per block forwards and Hessians x "
                         f"{e['weights_ratio']}, solves x {e['solve_ratio']}): {e['compress_s']:.0f} s")
    return lines
