"""How much of a decode step `OnnxCausalLM` spends outside ONNX Runtime (Python, binding, cache bookkeeping).

    python benchmarks/onnx_runner_overhead.py GRAPH_DIR [GRAPH_DIR ...] [--prompt 512] [--steps 64] [--rounds 3]

For each graph, ``--rounds`` times: a ``--prompt``-token random prompt, then ``--steps`` greedy decode steps, one
forward per token (the loop of ``onnx_cpu.py``); prints per step the wall time, the time inside
``session.run_with_iobinding`` (or ``session.run``) and the rest. To compare two versions of the runner, run the
same command with each on ``PYTHONPATH``.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from onnx_cpu import Loop  # noqa: E402  (the benchmark's own prefill / decode loop)


def measure(graph: Path, prompt: int, steps: int, rounds: int, threads: int) -> list[dict]:
    from sparsegpt_export.onnx import OnnxCausalLM

    model = OnnxCausalLM.from_pretrained(graph, num_threads=threads)
    inside = [0.0]
    for attr in ("run_with_iobinding", "run"):
        orig = getattr(model.session, attr)

        def timed(*a, _orig=orig, **k):
            t = time.perf_counter()
            try:
                return _orig(*a, **k)
            finally:
                inside[0] += time.perf_counter() - t

        setattr(model.session, attr, timed)
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, (1, prompt)).astype(np.int64)
    loop, rows = Loop(model), []
    for _ in range(rounds):
        out = loop.prefill(ids)
        inside[0] = 0.0
        t0 = time.perf_counter()
        loop.decode(out, steps, prompt)
        wall = (time.perf_counter() - t0) / steps * 1000
        rows.append({"wall_ms": wall, "session_ms": inside[0] / steps * 1000,
                     "outside_ms": wall - inside[0] / steps * 1000})
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("graphs", nargs="+", type=Path)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    import sparsegpt_export

    print(f"# runner: {Path(sparsegpt_export.__file__).parent}")
    for g in args.graphs:
        rows = measure(g, args.prompt, args.steps, args.rounds, args.threads)
        for r in rows:
            print(f"{g.name}: wall {r['wall_ms']:.2f} ms/step, in the session {r['session_ms']:.2f}, "
                  f"outside {r['outside_ms']:.2f}", flush=True)
        print(f"{g.name}: median outside {np.median([r['outside_ms'] for r in rows]):.2f} ms/step", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
