"""``python -m benchmarks run --suite {gemm,e2e,compress,all} [--device cuda|cpu] [--quick] [--out DIR]
[--peer-python PYTHON | --install-peer]``; ``python -m benchmarks gpu-check [--budget 480] [--quick]
[--device cuda|cpu] [--out DIR]`` (see `benchmarks.gpu_check`); ``python -m benchmarks coverage [--only TYPES]
[--timeout S]`` (the coverage sweep over transformers' causal LM families: `benchmarks.coverage`).

Each suite writes ``<out>/<device-name>/<suite>.json``, a Markdown table (``.md``) and, with matplotlib, a
PNG plot; the tables are printed last, with the ceilings (2x for 2:4 math; bytes per weight for decode).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from . import suites
from .harness import RESULTS, write_results

SUITES = {
    "gemm": (suites.run_gemm, suites.gemm_table, suites.gemm_plot),
    "e2e": (suites.run_e2e, suites.e2e_table, None),
    "compress": (suites.run_compress, suites.compress_table, None),
}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["coverage"]:  # its own options: see benchmarks/coverage.py
        from . import coverage

        return coverage.main(argv[1:])
    ap = argparse.ArgumentParser(prog="python -m benchmarks")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("coverage", help="coverage sweep over every causal LM family of transformers (python -m benchmarks "
                               "coverage --help)", add_help=False)
    run = sub.add_parser("run", help="run benchmark suites")
    run.add_argument("--suite", choices=[*SUITES, "all"], default="all")
    run.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    run.add_argument("--quick", action="store_true", help="small shapes and models: tests the harness in a minute")
    run.add_argument("--out", default=str(RESULTS), help="results folder (a subfolder per device)")
    run.add_argument("--peer-python", default=None,
                     help="compress suite: a Python with llmcompressor, run beside ours (default: "
                          "$SPARSEGPT_PEER_PYTHON, else ~/.cache/sparsegpt-export/llmcompressor-venv when it exists "
                          "and not --quick)")
    run.add_argument("--install-peer", action="store_true",
                     help="compress suite: create ~/.cache/sparsegpt-export/llmcompressor-venv (torch and "
                          "llmcompressor from the package index) when no peer Python is found")
    gpu = sub.add_parser("gpu-check", help="the CUDA tests, the gemm rows that matter and e2e inside a time budget")
    gpu.add_argument("--budget", type=float, default=480, help="seconds for the whole check (default 480)")
    gpu.add_argument("--quick", action="store_true", help="tiny shapes and model; on a CPU: a harness check")
    gpu.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    gpu.add_argument("--out", default=str(RESULTS), help="results folder (a subfolder per device)")
    args = ap.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("python -m benchmarks: error: --device cuda, but no CUDA device is available", file=sys.stderr)
        return 2
    if args.cmd == "gpu-check":
        if not args.quick and not device.startswith("cuda"):
            print("python -m benchmarks gpu-check: error: no CUDA device; use --quick for the CPU harness check",
                  file=sys.stderr)
            return 2
        from . import gpu_check

        return gpu_check.main(device, args.quick, args.budget, Path(args.out))
    tables = []
    for name in (SUITES if args.suite == "all" else [args.suite]):
        fn, table, plot = SUITES[name]
        print(f"== {name} on {device}{' (quick)' if args.quick else ''}", flush=True)
        kw = dict(peer_python=args.peer_python, install=args.install_peer) if name == "compress" else {}
        res = fn(device, args.quick, **kw)
        lines = table(res)
        folder = write_results(name, device, res, lines, Path(args.out), plot(res) if plot else None)
        tables.append(lines + ["", f"(written to {folder / name}.json/.md)"])
    for lines in tables:
        print("\n" + "\n".join(lines))
    print("\n" + "\n".join(suites.ceilings_table()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
