"""Screen per-matrix sparsity allocations on SmolLM2-135M-Instruct quickly, before the full protocol (issue #7).

A reduced version of ``accuracy_smollm2.py``'s protocol, to choose which allocations are worth the full runs:
calibration on the first ``--nsamples`` (default 32) windows of the fixed tokens
``../shared/data/calib-smollm2-c4-128x512.safetensors``, evaluation on WikiText-2 raw test only, ``--windows``
(default 4) x 2048 tokens. Each compression is its own process (``python -m sparsegpt_export compress``). The
figures are for ranking the methods against each other on the same reduced data, not for comparison with the
full-protocol tables.

    python -m benchmarks.experiments.allocation_screen [--sparsity 0.7] [--methods uniform,owl,obd,fisher,proxy,hutchinson]
        [--nsamples 32] [--windows 4] [--extra "--saliency isc"]

Methods: ``uniform``, ``owl`` (``--allocation owl``) or a ``--sensitivity`` score name (``--allocation
sensitivity --sensitivity NAME``). Writes ``<out>/allocation_screen.json`` (keyed by sparsity and method; earlier
entries kept) and appends the raw output to ``<out>/allocation_screen.log``.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

from benchmarks.protocol import CALIB, RESULTS, WIKI


def evaluate_wikitext(model_dir: str, windows: int, seqlen: int) -> float:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sparsegpt_export.calibration import load_eval_text
    from sparsegpt_export.evaluation import perplexity

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(model_dir)
    return round(perplexity(model, tok, load_eval_text(str(WIKI)), seqlen=seqlen, windows=windows)["ppl"], 4)


def _args(method: str) -> list[str]:
    if method == "uniform":
        return []
    if method == "owl":
        return ["--allocation", "owl"]
    return ["--allocation", "sensitivity", "--sensitivity", method]


def main() -> int:
    import os
    import subprocess

    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sparsity", type=float, default=0.7)
    ap.add_argument("--methods", default="uniform,owl,obd,fisher,proxy")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--extra", default="", help="more compress arguments for every run, e.g. '--alpha 0.05'")
    ap.add_argument("--tag", default="", help="suffix of the JSON keys (to tell --extra variants apart)")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--work", default=str(Path.home() / ".cache" / "sparsegpt-export" / "screen"))
    args = ap.parse_args()
    if not CALIB.exists():
        print(f"skipped: {CALIB} is missing (see ../shared/data/README)")
        return 0
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    log_f = open(out / "allocation_screen.log", "a")

    def log(msg: str) -> None:
        print(msg, flush=True)
        log_f.write(msg + "\n")
        log_f.flush()

    path = out / "allocation_screen.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    results["protocol"] = (f"calibration first {args.nsamples} x 512 of {CALIB.name}; WikiText-2 raw test "
                           f"{args.windows} x 2048; torch {torch.__version__}, {torch.get_num_threads()} threads")
    log(f"=== allocation_screen {time.strftime('%Y-%m-%d %H:%M:%S')}: sparsity {args.sparsity}, {results['protocol']}")
    for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
        key = f"{args.sparsity:g} {method}{args.tag}"
        d = work / key.replace(" ", "_")
        cmd = [sys.executable, "-m", "sparsegpt_export", "compress", "smollm2-135m", "--dataset", str(CALIB),
               "--nsamples", str(args.nsamples), "--seqlen", "512", "--seed", "0", "--device", "cpu",
               "--pattern", "unstructured", "--sparsity", str(args.sparsity), "--bits", "none", "--out", str(d),
               "--overwrite", "--no-progress", "--sensitivity-cache", str(work / f"scores-{method}.json"),
               *_args(method), *shlex.split(args.extra)]
        log(f"$ {' '.join(cmd[1:])}")
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            log(proc.stdout.rstrip())
            raise RuntimeError(f"compress failed: {key}")
        report = json.loads((d / "sparsegpt_report.json").read_text())
        ppl = evaluate_wikitext(str(d), args.windows, 2048)
        layers = [x for x in report["layers"] if "sparsity" in x]
        r = {"wikitext2_ppl": ppl, "wall_s": round(wall, 1), "sensitivity_s": report["profile"].get("plan_s", 0.0),
             "sparsity": report["summary"]["weighted_sparsity"],
             "layer_sparsity_range": [min(x["sparsity"] for x in layers), max(x["sparsity"] for x in layers)],
             "warnings": report.get("warnings", [])[:5], "command": " ".join(cmd[1:])}
        results[key] = r
        log(f"   {key}: wikitext2 {ppl:.3f}  sparsity {r['sparsity']:.4f}  range {r['layer_sparsity_range']}  "
            f"wall {r['wall_s']} s (sensitivity {r['sensitivity_s']} s)")
        path.write_text(json.dumps(results, indent=2) + "\n")
        for f in d.glob("*.safetensors"):
            os.unlink(f)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
