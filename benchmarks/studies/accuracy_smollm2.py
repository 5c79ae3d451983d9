"""Benchmark: accuracy beyond plain SparseGPT on SmolLM2-135M-Instruct (issue #7).

Same protocol as ``compress_smollm2.py``: calibration on the fixed tokens
``../shared/data/calib-smollm2-c4-128x512.safetensors`` (128 x 512 from C4 rows [0, 1000), seed 0); evaluation on
WikiText-2 raw test and C4 validation rows [1000, 2000), 16 windows x 2048 tokens. Each compression is its own
process (``python -m sparsegpt_export compress ...``): wall time includes loading and writing, peak resident
memory is that process's own.

Rows: unstructured 50/60/70% with uniform sparsity, sensitivity allocation (Hutchinson or OBD scores, OBS and ISC
saliency) and OWL; strict 2:4 with SparseGPT's OBS sweep, with the ADMM update (gradual mask), with the 10% most
sensitive layers kept dense, and 2:4 + 4-bit g128 symmetric with ADMM. The sensitivity runs share one score cache
(``sparsegpt-sensitivity.json`` beside their outputs), so the first of them pays for the Hutchinson probes and
the others reuse them: the ``sensitivity_s`` column says which.

    python -m benchmarks.studies.accuracy_smollm2 [--rows NAME,...] [--work DIR] [--out benchmarks/results] [--fresh]

Rows already in ``<out>/accuracy_smollm2.json`` are kept unless ``--fresh`` (which recomputes the rows named in
``--rows``, keeping the others); the JSON and the Markdown table are rewritten after every row, and the raw output
is appended to ``accuracy_smollm2.log``.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

from benchmarks.protocol import CALIB, RESULTS
from benchmarks.studies.compress_smollm2 import evaluate, run_compress

NONE = ["--bits", "none"]


def _unstructured(p: float, *extra: str) -> list[str]:
    return ["--pattern", "unstructured", "--sparsity", str(p), *NONE, *extra]


SENS = ["--allocation", "sensitivity", "--sensitivity", "hutchinson"]
OBD = ["--allocation", "sensitivity", "--sensitivity", "obd"]  # mean OBD saliency per matrix (32 windows)
ROWS: dict[str, list[str] | None] = {  # in the order of the bars they decide
    "dense": None,
    "2:4 obs": ["--pattern", "2:4", *NONE],
    "2:4 admm": ["--pattern", "2:4", *NONE, "--update", "admm"],
    "70% uniform": _unstructured(0.7),
    "70% sensitivity obs": _unstructured(0.7, *SENS),
    "70% sensitivity obd": _unstructured(0.7, *OBD),
    "2:4+w4g128 admm": ["--pattern", "2:4", "--bits", "4", "--group-size", "128", "--sym", "--update", "admm"],
    "50% uniform": _unstructured(0.5),
    "50% sensitivity obs": _unstructured(0.5, *SENS),
    "50% sensitivity obd": _unstructured(0.5, *OBD),
    "70% sensitivity isc": _unstructured(0.7, *SENS, "--saliency", "isc"),
    "70% sensitivity obd isc": _unstructured(0.7, *OBD, "--saliency", "isc"),
    "70% owl": _unstructured(0.7, "--allocation", "owl"),
    "2:4 dense-fraction 0.1": ["--pattern", "2:4", *NONE, *OBD[2:], "--dense-fraction", "0.1"],
    "2:4 dense-fraction 0.1 hutchinson": ["--pattern", "2:4", *NONE, *SENS[2:], "--dense-fraction", "0.1"],
    "50% sensitivity isc": _unstructured(0.5, *SENS, "--saliency", "isc"),
    "50% sensitivity obd isc": _unstructured(0.5, *OBD, "--saliency", "isc"),
    "50% owl": _unstructured(0.5, "--allocation", "owl"),
    "60% uniform": _unstructured(0.6),
    "60% sensitivity obs": _unstructured(0.6, *SENS),
    "60% sensitivity obd": _unstructured(0.6, *OBD),
    "60% sensitivity isc": _unstructured(0.6, *SENS, "--saliency", "isc"),
    "60% sensitivity obd isc": _unstructured(0.6, *OBD, "--saliency", "isc"),
    "60% owl": _unstructured(0.6, "--allocation", "owl"),
    "2:4+w4g128 obs": ["--pattern", "2:4", "--bits", "4", "--group-size", "128", "--sym"],
}


def write_tables(results: dict, out: Path) -> None:
    (out / "accuracy_smollm2.json").write_text(json.dumps(results, indent=2) + "\n")
    rows = results["rows"]
    dense = rows.get("dense")
    lines = ["| method | WikiText-2 ppl | x dense | C4 ppl | x dense | sparsity | compress wall s | of which "
             "sensitivity s | peak RSS MB | mean layer rel. error |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        xw = f"{r['wikitext2_ppl'] / dense['wikitext2_ppl']:.2f}" if dense else "-"
        xc = f"{r['c4_ppl'] / dense['c4_ppl']:.2f}" if dense else "-"
        sp = f"{r['sparsity']:.4f}" if "sparsity" in r else "-"
        err = f"{r['mean_rel_error']:.4g}" if "mean_rel_error" in r else "-"
        lines.append(f"| {name} | {r['wikitext2_ppl']:.2f} | {xw} | {r['c4_ppl']:.2f} | {xc} | {sp} | "
                     f"{r.get('wall_s', '-')} | {r.get('sensitivity_s', '-')} | {r.get('peak_rss_mb', '-')} | {err} |")
    hdr = (f"SmolLM2-135M-Instruct, calibration 128 x 512 fixed C4 tokens, eval {results['windows']} windows x "
           f"{results['seqlen']} tokens; machine: {results['machine']}\n\n")
    (out / "accuracy_smollm2.md").write_text(hdr + "\n".join(lines) + "\n")


def main() -> int:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default=",".join(ROWS), help="comma-separated row names (default: all, in order)")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--work", default=str(Path.home() / ".cache" / "sparsegpt-export" / "accuracy"))
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--fresh", action="store_true", help="recompute the --rows already in the JSON (others are kept)")
    args = ap.parse_args()
    if not CALIB.exists():
        print(f"skipped: {CALIB} is missing (see ../shared/data/README)")
        return 0
    names = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in names if r not in ROWS]
    if unknown:
        ap.error(f"unknown rows {unknown}; known: {list(ROWS)}")
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    log_f = open(out / "accuracy_smollm2.log", "a")

    def log(msg: str) -> None:
        print(msg, flush=True)
        log_f.write(msg + "\n")
        log_f.flush()

    path = out / "accuracy_smollm2.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    results.update(machine=f"{platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}",
                   windows=args.windows, seqlen=args.seqlen)
    results.setdefault("rows", {})
    for name in names:
        if name in results["rows"] and not args.fresh:
            log(f"== {name}: kept from {path.name}")
            continue
        log(f"== {name}  ({time.strftime('%Y-%m-%d %H:%M:%S')})")
        extra = ROWS[name]
        if extra is None:
            from sparsegpt_export.models import resolve_model

            r = evaluate(resolve_model("smollm2-135m"), args.windows, args.seqlen)
        else:
            d = work / name.replace(" ", "_").replace(":", "-").replace("%", "pct")
            info = run_compress(extra, d, log)
            report = json.loads((d / "sparsegpt_report.json").read_text())
            info["sensitivity_s"] = report["profile"].get("plan_s", 0.0)
            layers = [x for x in report["layers"] if "sparsity" in x]
            info["layer_sparsity_range"] = [min(x["sparsity"] for x in layers), max(x["sparsity"] for x in layers)]
            if "admm_error_reduction_mean" in report["summary"]:
                info["admm_error_reduction_mean"] = report["summary"]["admm_error_reduction_mean"]
            r = {**info, **evaluate(str(d), args.windows, args.seqlen)}
            for f in d.glob("*.safetensors"):  # keep the report and config, not 0.5 GB of weights per row
                f.unlink()
        results["rows"][name] = r
        log(f"   wikitext2 {r['wikitext2_ppl']:.4f}  c4 {r['c4_ppl']:.4f}  " +
            " ".join(f"{k} {r[k]}" for k in ("wall_s", "sensitivity_s", "peak_rss_mb", "sparsity") if k in r))
        write_tables(results, out)
    log((out / "accuracy_smollm2.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
