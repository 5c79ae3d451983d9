"""Issue #26: the weight updates and block reconstruction side by side on SmolLM2-135M, one row per variant, each
compression its own process run alone (wall time and that process's peak RSS), then WikiText-2 and C4 perplexity.

Rows (the README's default command, 2:4 + 4-bit g128 sym, unless "2:4" alone):

- ``obs``: SparseGPT's sweep, unsmoothed (``--update obs --smooth-alpha 0``: the default before this issue);
- ``default``: the README's command as it is now (``--update auto``: the new ADMM for N:M; ``--smooth-alpha
  auto``: smoothing 0.6 with 4-bit on Llama-style models); ``unsmoothed``: the same with ``--smooth-alpha 0``
  (the default of commit 13702dc and before);
- ``admm-40``: ADMM as before (40 iterations, unsmoothed);
- ``reconstruct-N``: the default plus ``--reconstruct-steps N``.

2:4 alone is never smoothed by default (``auto`` smooths only with ``--bits``).

    python -m benchmarks.studies.best_quality [--rows dense,obs-w4,...] [--out benchmarks/results]

Writes ``<out>/best_quality.{json,md,log}`` after every row (rows already in the JSON are kept unless re-run).
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path

from benchmarks.protocol import data_missing, rows_parser
from benchmarks.studies.compress_smollm2 import evaluate, run_compress

W4 = ["--pattern", "2:4", "--bits", "4", "--group-size", "128", "--sym"]
P24 = ["--pattern", "2:4", "--bits", "none"]
ROWS = {
    "dense": None,
    "obs / 2:4+w4": [*W4, "--update", "obs", "--smooth-alpha", "0"],
    "ADMM, unsmoothed / 2:4+w4": [*W4, "--smooth-alpha", "0"],
    "default (ADMM + smoothing) / 2:4+w4": W4,
    "obs / 2:4": [*P24, "--update", "obs"],
    "default (new ADMM) / 2:4": P24,
    "reconstruct-64 / 2:4": [*P24, "--reconstruct-steps", "64"],
    "reconstruct-64, unsmoothed / 2:4+w4": [*W4, "--smooth-alpha", "0", "--reconstruct-steps", "64"],
    "reconstruct-64 / 2:4+w4": [*W4, "--reconstruct-steps", "64"],
    "reconstruct-32 / 2:4": [*P24, "--reconstruct-steps", "32"],
    "admm-40 (as before) / 2:4+w4": [*W4, "--update", "admm", "--refine-steps", "40", "--smooth-alpha", "0"],
}
NAME = "best_quality"


def write_tables(results: dict, out: Path) -> None:
    (out / f"{NAME}.json").write_text(json.dumps(results, indent=2) + "\n")
    rows = results["rows"]
    dense = rows.get("dense")
    base = {"2:4+w4": rows.get("obs / 2:4+w4"), "2:4": rows.get("obs / 2:4")}
    lines = ["| variant | WikiText-2 ppl | x dense | C4 ppl | x dense | compress wall s | x obs wall | peak RSS MB |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        xw = f"{r['wikitext2_ppl'] / dense['wikitext2_ppl']:.2f}" if dense else "-"
        xc = f"{r['c4_ppl'] / dense['c4_ppl']:.2f}" if dense else "-"
        ref = base.get(name.rsplit(" / ", 1)[-1])
        xo = f"{r['wall_s'] / ref['wall_s']:.2f}" if ref and "wall_s" in r else "-"
        lines.append(f"| {name} | {r['wikitext2_ppl']:.2f} | {xw} | {r['c4_ppl']:.2f} | {xc} | "
                     f"{r.get('wall_s', '-')} | {xo} | {r.get('peak_rss_mb', '-')} |")
    hdr = (f"SmolLM2-135M-Instruct, calibration 128 x 512 fixed C4 tokens, eval {results['windows']} windows x "
           f"{results['seqlen']} tokens; each row its own process, run one after another; machine: "
           f"{results['machine']}. Command: `python -m benchmarks.studies.best_quality`.\n\n")
    (out / f"{NAME}.md").write_text(hdr + "\n".join(lines) + "\n")


def main() -> int:
    ap = rows_parser(__doc__.splitlines()[0], ROWS)
    args = ap.parse_args()
    missing = data_missing()
    if missing:
        print(f"skipped: {missing} not found (the shared data folder is needed for this benchmark)")
        return 0
    unknown = [r for r in args.rows.split(",") if r not in ROWS]
    if unknown:
        ap.error(f"--rows: unknown {unknown}; choose from {list(ROWS)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    logf = open(out / f"{NAME}.log", "a")

    def log(msg: str) -> None:
        print(msg, flush=True)
        logf.write(msg + "\n")
        logf.flush()

    import torch

    from sparsegpt_export.models import resolve_model

    jf = out / f"{NAME}.json"
    results = json.loads(jf.read_text()) if jf.is_file() else {"rows": {}}
    results.update(windows=args.windows, seqlen=args.seqlen,
                   machine=f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}")
    work = Path(tempfile.mkdtemp(prefix="best-quality-"))
    try:
        for name in args.rows.split(","):
            log(f"== {name}")
            if ROWS[name] is None:
                row = evaluate(resolve_model("smollm2-135m"), args.windows, args.seqlen)
            else:
                row = run_compress(ROWS[name], work / "out", log)
                report = json.loads((work / "out" / "sparsegpt_report.json").read_text())
                if "reconstruction" in report:
                    blocks = report["reconstruction"]["blocks"]
                    row["reconstruction_error_before_after"] = [
                        round(sum(b["error_before"] for b in blocks) / len(blocks), 5),
                        round(sum(b["error_after"] for b in blocks) / len(blocks), 5)]
                row.update(evaluate(str(work / "out"), args.windows, args.seqlen))
            results["rows"][name] = row
            log(json.dumps({name: row}))
            write_tables(results, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print((out / f"{NAME}.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
