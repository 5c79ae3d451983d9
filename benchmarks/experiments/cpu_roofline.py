"""How fast this CPU does the arithmetic a SmolLM2 compression pass needs, and the floor that sets.

Measures float32 GEMM throughput at SmolLM2-135M's shapes for 128 x 512 calibration tokens (a linear layer's
forward and a Hessian X^T X), then prints the minimum time of one compression pass's linear forwards and
Hessians at that throughput (30 blocks; attention, norms and the solver not counted).

    python -m benchmarks.experiments.cpu_roofline   ->  benchmarks/results/cpu_roofline.json
"""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

TOKENS, HIDDEN, INTER, KV, BLOCKS = 128 * 512, 576, 1536, 192, 30


def timed(fn, reps=5):
    fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts), max(ts) - min(ts)


def main() -> None:
    torch.manual_seed(0)
    x = torch.randn(TOKENS, HIDDEN)
    w = torch.randn(INTER, HIDDEN)
    x2 = torch.randn(TOKENS, INTER)
    lin, lin_spread = timed(lambda: F.linear(x, w))
    xtx, xtx_spread = timed(lambda: x2.t() @ x2, reps=3)
    gf_lin = 2 * TOKENS * HIDDEN * INTER / lin / 1e9
    gf_xtx = 2 * TOKENS * INTER * INTER / xtx / 1e9
    # per block: q, k, v, o, gate, up, down forwards; Hessians of 3 distinct 576-wide inputs and one 1536-wide
    lin_flops = 2 * TOKENS * (HIDDEN * HIDDEN * 2 + HIDDEN * KV * 2 + 3 * HIDDEN * INTER)
    hes_flops = 2 * TOKENS * (3 * HIDDEN * HIDDEN + INTER * INTER)
    res = {
        "threads": torch.get_num_threads(),
        "linear_576x1536_gflops": round(gf_lin, 1), "linear_median_s": round(lin, 4), "linear_spread_s": round(lin_spread, 4),
        "xtx_1536_gflops": round(gf_xtx, 1), "xtx_median_s": round(xtx, 4), "xtx_spread_s": round(xtx_spread, 4),
        "pass_linear_forward_floor_s": round(BLOCKS * lin_flops / (gf_lin * 1e9), 1),
        "pass_hessian_full_gemm_floor_s": round(BLOCKS * hes_flops / (gf_xtx * 1e9), 1),
    }
    out = Path(__file__).resolve().parents[1] / "results" / "cpu_roofline.json"
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
