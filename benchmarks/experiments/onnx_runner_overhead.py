"""How much of a decode step `OnnxCausalLM` spends outside ONNX Runtime (Python, binding, cache bookkeeping), in the
bare loop and under ``generate()``.

    python -m benchmarks.experiments.onnx_runner_overhead GRAPH_DIR [GRAPH_DIR ...] [--prompt 512] [--steps 64] [--rounds 3]
                                              [--modes loop,generate,generate-torch-threads]

For each graph, ``--rounds`` times and the modes in turn (round-robin): a ``--prompt``-token random prompt, then
``--steps`` greedy tokens: ``loop`` one forward per token (the loop of ``onnx_cpu.py``), ``generate``
``model.generate(max_new_tokens=steps)`` as users call it (torch on one thread while it runs, the runner's default),
``generate-torch-threads`` the same with torch's thread setting left alone (``torch_threads=None``: what
``generate`` did before). Prints per token the wall time, the time inside ``session.run_with_iobinding`` (or
``session.run``), the rest (wall), and the main thread's CPU time outside the session (``time.thread_time``: the
Python work itself, which other processes on the machine do not inflate the way they do wall time). To compare two
versions of the runner, run the same command with each on ``PYTHONPATH``.
"""
from __future__ import annotations

import argparse
import subprocess
import time
from pathlib import Path

import numpy as np

from benchmarks.studies.onnx_cpu import Gen, Loop  # the benchmark's own loop and generate() runner


class Timed:
    """Wraps a session's run methods and adds up the wall and main-thread CPU seconds spent inside them."""

    def __init__(self, session):
        self.wall = self.cpu = 0.0
        for attr in ("run_with_iobinding", "run"):
            setattr(session, attr, self._wrap(getattr(session, attr)))

    def _wrap(self, orig):
        def timed(*a, **k):
            t, c = time.perf_counter(), time.thread_time()
            try:
                return orig(*a, **k)
            finally:
                self.wall += time.perf_counter() - t
                self.cpu += time.thread_time() - c
        return timed


def measure(graph: Path, modes: list[str], prompt: int, steps: int, rounds: int, threads: int) -> dict:
    from sparsegpt_export.onnx import OnnxCausalLM

    model = OnnxCausalLM.from_pretrained(graph, num_threads=threads)
    timer = Timed(model.session)
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, (1, prompt)).astype(np.int64)
    rows = {m: [] for m in modes}
    for _ in range(rounds + 1):  # the first round is a warm-up
        for mode in modes:
            model.torch_threads = None if mode == "generate-torch-threads" else 1
            runner = Loop(model) if mode == "loop" else Gen(model)
            timer.wall = timer.cpu = 0.0
            t0, c0 = time.perf_counter(), time.thread_time()
            runner.greedy(ids, steps)
            wall, cpu = time.perf_counter() - t0, time.thread_time() - c0
            rows[mode].append({"wall_ms": wall / steps * 1000, "session_ms": timer.wall / steps * 1000,
                               "outside_ms": (wall - timer.wall) / steps * 1000,
                               "outside_cpu_ms": (cpu - timer.cpu) / steps * 1000})
    return {m: r[1:] for m, r in rows.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("graphs", nargs="+", type=Path)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--modes", default="loop,generate,generate-torch-threads")
    args = ap.parse_args()
    import sparsegpt_export

    print(f"# runner: {Path(sparsegpt_export.__file__).parent}")
    print(f"# load before: {subprocess.run(['uptime'], stdout=subprocess.PIPE, text=True).stdout.strip()}", flush=True)
    for g in args.graphs:
        rows = measure(g, args.modes.split(","), args.prompt, args.steps, args.rounds, args.threads)
        for mode, rs in rows.items():
            for r in rs:
                print(f"{g.name} {mode}: wall {r['wall_ms']:.2f} ms/token, in the session {r['session_ms']:.2f}, "
                      f"outside {r['outside_ms']:.2f} (main-thread CPU {r['outside_cpu_ms']:.3f})", flush=True)
            print(f"{g.name} {mode}: median wall {np.median([r['wall_ms'] for r in rs]):.2f} ms/token, outside "
                  f"{np.median([r['outside_ms'] for r in rs]):.2f}, main-thread CPU outside "
                  f"{np.median([r['outside_cpu_ms'] for r in rs]):.3f}", flush=True)
    print(f"# load after: {subprocess.run(['uptime'], stdout=subprocess.PIPE, text=True).stdout.strip()}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
