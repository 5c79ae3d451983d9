"""Benchmark: SparseGPT on SmolLM2-135M-Instruct, perplexity / wall time / peak memory per method.

Calibration: the fixed tokens ``../shared/data/calib-smollm2-c4-128x512.safetensors`` (128 windows of 512
tokens from C4 rows [0, 1000), seed 0). Evaluation: WikiText-2 raw test and C4 validation rows [1000, 2000)
joined with a space, 16 windows of 2048 tokens each.

Each compression runs as its own process (``python -m sparsegpt_export compress ...``), so its wall time
includes loading and writing, and its peak resident memory is that process's own (``os.wait4`` rusage).

    python -m benchmarks.studies.compress_smollm2 [--rows dense,magnitude-2:4,...] [--out benchmarks/results]

Results go to ``<out>/compress_smollm2.json`` and ``.md`` after every row.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.protocol import C4, CALIB, WIKI, data_missing, perplexities, rows_parser, run_process

ROWS = {
    "dense": None,
    "magnitude-2:4": "magnitude",
    "sparsegpt-2:4": ["--pattern", "2:4", "--bits", "none"],
    "sparsegpt-2:4+w4g128-sym": ["--pattern", "2:4", "--bits", "4", "--group-size", "128", "--sym"],
    "sparsegpt-2:4+w4g128-asym": ["--pattern", "2:4", "--bits", "4", "--group-size", "128", "--asym"],
    "sparsegpt-4:8": ["--pattern", "4:8", "--bits", "none"],
    "sparsegpt-50%-unstructured": ["--pattern", "unstructured", "--sparsity", "0.5", "--bits", "none"],
    "sparsegpt-2:4+w4g128-asym-no-refit": ["--pattern", "2:4", "--bits", "4", "--group-size", "128", "--asym",
                                           "--no-refit-scales", "--quant-order", "joint"],
    "sparsegpt-2:4+w4g128-sym-joint": ["--pattern", "2:4", "--bits", "4", "--group-size", "128", "--sym",
                                       "--quant-order", "joint"],
    "sparsegpt-2:4+w4g128-asym-joint": ["--pattern", "2:4", "--bits", "4", "--group-size", "128", "--asym",
                                        "--quant-order", "joint"],
    "sparsegpt-2:4+w4g128-sym-joint-hessian64": ["--pattern", "2:4", "--bits", "4", "--group-size", "128", "--sym",
                                                 "--quant-order", "joint", "--hessian-dtype", "float64"],
    "sparsegpt-2:4+w4g128-sym-admm": ["--pattern", "2:4", "--bits", "4", "--group-size", "128", "--sym",
                                      "--update", "admm"],
    "sparsegpt-2:4+w4g128-sym-plain-grid": ["--pattern", "2:4", "--bits", "4", "--group-size", "128", "--sym",
                                            "--no-fit-scales", "--no-clip-search", "--no-refit-scales", "--quant-order", "joint"],
}


def run_compress(extra: list[str], out: Path, log) -> dict:
    cmd = [sys.executable, "-m", "sparsegpt_export", "compress", "smollm2-135m", "--dataset", str(CALIB),
           "--nsamples", "128", "--seqlen", "512", "--seed", "0", "--device", "cpu", "--out", str(out),
           "--overwrite", "--no-progress", *extra]
    log(f"$ {' '.join(cmd[1:])}")
    r = run_process(cmd)
    log(r["output"].rstrip())
    if r["rc"] != 0:
        raise RuntimeError(f"compress failed: {' '.join(cmd)}")
    report = json.loads((out / "sparsegpt_report.json").read_text())
    return {"wall_s": round(r["wall_s"], 1), "peak_rss_mb": r["peak_rss_mb"],
            "compress_s": report["summary"]["wall_s"], "profile": report["profile"],
            "mean_rel_error": report["summary"]["mean_rel_error"], "sparsity": report["summary"]["weighted_sparsity"],
            "command": " ".join(cmd[1:])}


def evaluate(model_dir: str, windows: int, seqlen: int) -> dict:
    return perplexities(model_dir, windows, seqlen)


def _eval_model(model, tok, windows, seqlen) -> dict:
    from sparsegpt_export.calibration import load_eval_text
    from sparsegpt_export.evaluation import perplexity

    wiki = perplexity(model, tok, load_eval_text(str(WIKI)), seqlen=seqlen, windows=windows)
    c4 = perplexity(model, tok, load_eval_text(str(C4), (1000, 2000)), seqlen=seqlen, windows=windows)
    return {"wikitext2_ppl": round(wiki["ppl"], 4), "c4_ppl": round(c4["ppl"], 4), "windows": wiki["windows"],
            "seqlen": seqlen}


def magnitude(model_dir: str, windows: int, seqlen: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sparsegpt_export.anatomy import block_linears, find_blocks, get_weight, set_weight
    from sparsegpt_export.solver import magnitude_prune

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(model_dir)
    _, blocks = find_blocks(model)
    for b in blocks:
        for mod in block_linears(b).values():
            set_weight(mod, magnitude_prune(get_weight(mod), n=2, m=4))
    wall = time.perf_counter() - t0
    return {**_eval_model(model, tok, windows, seqlen), "compress_s": round(wall, 1)}


def write_tables(results: dict, out: Path) -> None:
    (out / "compress_smollm2.json").write_text(json.dumps(results, indent=2) + "\n")
    dense = results["rows"].get("dense", {})
    lines = [
        "| method | WikiText-2 ppl | x dense | C4 ppl | x dense | compress wall s | peak RSS MB |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in results["rows"].items():
        xw = f"{r['wikitext2_ppl'] / dense['wikitext2_ppl']:.2f}" if dense else "-"
        xc = f"{r['c4_ppl'] / dense['c4_ppl']:.2f}" if dense else "-"
        lines.append(f"| {name} | {r['wikitext2_ppl']:.2f} | {xw} | {r['c4_ppl']:.2f} | {xc} | "
                     f"{r.get('wall_s', r.get('compress_s', '-'))} | {r.get('peak_rss_mb', '-')} |")
    hdr = (f"SmolLM2-135M-Instruct, calibration 128 x 512 fixed C4 tokens, eval {results['windows']} windows x "
           f"{results['seqlen']} tokens; machine: {results['machine']}\n\n")
    (out / "compress_smollm2.md").write_text(hdr + "\n".join(lines) + "\n")


def main() -> int:
    args = rows_parser(__doc__.splitlines()[0], ROWS).parse_args()
    missing = data_missing()
    if missing:
        print(f"skipped: {missing} not found (the shared data folder is needed for this benchmark)")
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    logf = open(out / "compress_smollm2.log", "a")

    def log(msg: str) -> None:
        print(msg, flush=True)
        logf.write(msg + "\n")
        logf.flush()

    from sparsegpt_export.models import resolve_model

    dense_dir = resolve_model("smollm2-135m")
    jf = out / "compress_smollm2.json"
    results = json.loads(jf.read_text()) if jf.is_file() else {"rows": {}}
    import torch

    results.update(windows=args.windows, seqlen=args.seqlen,
                   machine=f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__} threads {torch.get_num_threads()}")
    work = Path(tempfile.mkdtemp(prefix="bench-smollm2-"))
    try:
        for name in args.rows.split(","):
            spec = ROWS[name]
            log(f"== {name}")
            if spec is None:
                row = evaluate(dense_dir, args.windows, args.seqlen)
            elif spec == "magnitude":
                row = magnitude(dense_dir, args.windows, args.seqlen)
            else:
                row = run_compress(spec, work / "out", log)
                row.update(evaluate(str(work / "out"), args.windows, args.seqlen))
            results["rows"][name] = row
            log(json.dumps({name: row}))
            write_tables(results, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print((out / "compress_smollm2.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
