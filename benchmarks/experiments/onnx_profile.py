"""Where a decode step of an ONNX export spends its time: ONNX Runtime's profiler, kernel time per op type.

    python -m benchmarks.experiments.onnx_profile GRAPH_DIR [GRAPH_DIR ...] [--past 16 512] [--threads 2] [--steps 30]

For each graph and past length: one decode step (one new token after ``past`` cached ones, random cache) run
``--steps`` times after a warm-up, with profiling on; prints the wall time per step, the kernel time per step
and the op types that take most of it. Kernel times are measured with the profiler on (it adds overhead):
compare them with each other, not with the benchmark's tokens/s.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np


def profile(graph: Path, past: int, threads: int, steps: int) -> dict:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.enable_profiling = True
    opts.profile_file_prefix = os.path.join(tempfile.mkdtemp(), "prof")
    s = ort.InferenceSession(str(graph / "model.onnx"), opts, providers=["CPUExecutionProvider"])
    names = [i for i in s.get_inputs() if i.name.startswith("input.past_key_values")]
    feeds = {"input_ids": np.array([[5]], np.int64), "attention_mask": np.ones((1, past + 1), np.int64),
             "position_ids": np.array([[past]], np.int64)}
    rng = np.random.default_rng(0)
    for i in names:
        feeds[i.name] = rng.standard_normal((1, i.shape[1], past, i.shape[3])).astype(np.float32)
    for _ in range(3):
        s.run(None, feeds)
    t0 = time.perf_counter()
    for _ in range(steps):
        s.run(None, feeds)
    wall = (time.perf_counter() - t0) / steps
    events = json.loads(Path(s.end_profiling()).read_text())
    per_op, nodes = collections.Counter(), 0
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            per_op[e["args"]["op_name"]] += e["dur"] / 1000 / (steps + 3)
            nodes += 1
    return {"wall_ms_with_profiler": 1000 * wall, "kernel_ms": sum(per_op.values()), "nodes": nodes // (steps + 3),
            "per_op_ms": dict(per_op.most_common())}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("graphs", nargs="+", type=Path)
    ap.add_argument("--past", type=int, nargs="+", default=[16, 512])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args()
    for g in args.graphs:
        for past in args.past:
            r = profile(g, past, args.threads, args.steps)
            top = ", ".join(f"{k} {v:.2f}" for k, v in list(r["per_op_ms"].items())[:10])
            print(f"{g.name} past {past}: {r['nodes']} nodes/step, kernels {r['kernel_ms']:.1f} ms/step "
                  f"(wall {r['wall_ms_with_profiler']:.1f} ms with the profiler on); top: {top}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
