"""Benchmark: activation smoothing (``compress --smooth-alpha``) against ONNX Runtime's int8 activations.

MatMulNBits at ``accuracy_level`` 4 rounds each activation row to int8 per block of the weight's group; SmolLM2's
outlier channels make that the largest error of the int4 graph. For each ``--alphas`` value (0 = no smoothing),
on SmolLM2-135M-Instruct 2:4 + 4-bit g128 symmetric (the calibration of ``onnx_cpu.py``):

1. ``compress --smooth-alpha A`` (reused from ``--work`` when there) and ``export --format onnx`` (gqa graph,
   MatMulNBits);
2. logits parity of the graph against the torch compressed model on the 512-token WikiText-2 window of
   ``onnx_cpu.py``, MatMulNBits at accuracy_level 1 and 4 (``||diff|| / ||torch||`` over all logits);
3. the torch compressed model's perplexity on WikiText-2 and C4 (16 windows of 2048, as ``compress_smollm2.py``).

    python -m benchmarks.studies.onnx_smoothing [--alphas 0,0.5] [--work DIR] [--out benchmarks/results]
    python -m benchmarks.studies.onnx_smoothing --alphas 0.6 --lm-head-alphas 0,0.3,0.6

Writes ``<out>/onnx_smoothing.{json,md,log}``. With ``--lm-head-alphas``, every row also quantizes the lm_head
(``--quantize-lm-head``), its final norm -> lm_head pair smoothed with each of those strengths
(``--smooth-lm-head-alpha``), and writes ``<out>/onnx_smoothing_lmhead.{json,md,log}``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.studies import compress_smollm2 as CS
from benchmarks.studies import onnx_cpu as B


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--alphas", default="0,0.5")
    ap.add_argument("--lm-head-alphas", default=None,
                    help="quantize the lm_head too, its pair smoothed with each of these (comma separated)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", default=str(Path.home() / ".cache" / "sparsegpt-export" / "bench-smooth"))
    ap.add_argument("--out", default=str(B.RESULTS))
    args = ap.parse_args()
    for f in (B.CALIB, B.WIKI, CS.C4):
        if not f.is_file():
            print(f"skipped: {f} is missing (set SPARSEGPT_DATA to the shared data folder)")
            return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    name = "onnx_smoothing_lmhead" if args.lm_head_alphas else "onnx_smoothing"
    log = B.Log(out / f"{name}.log")
    torch.set_num_threads(args.threads)
    import onnxruntime as ort
    from transformers import AutoModelForCausalLM, AutoTokenizer

    py = sys.executable
    log(f"# onnx_smoothing: torch {torch.__version__}, onnxruntime {ort.__version__}, threads {args.threads}")
    result: dict = {"rows": {}}
    heads = [None] if args.lm_head_alphas is None else [float(x) for x in args.lm_head_alphas.split(",")]
    for a, h in [(float(x), h) for x in args.alphas.split(",") for h in heads]:
        tag = f"alpha{a:g}" + ("" if h is None else f"-lmhead{h:g}")
        src, graph = work / f"c-{tag}", work / f"onnx-{tag}"
        row: dict = {"smooth_alpha": a}
        extra = [] if h is None else ["--quantize-lm-head", "--smooth-lm-head-alpha", str(h)]
        if h is not None:
            row["smooth_lm_head_alpha"] = h
        if not (src / "sparsegpt_config.json").is_file():
            row["compress_s"] = round(B.sh([py, "-m", "sparsegpt_export", "compress", "smollm2-135m", *B.COMPRESS,
                                            "--smooth-alpha", str(a), *extra, "--out", str(src), "--overwrite",
                                            "--no-progress"], log), 1)
        else:
            log(f"reusing {src}")
        if not (graph / "sparsegpt_onnx.json").is_file():
            B.sh([py, "-m", "sparsegpt_export", "export", str(src), "--format", "onnx", "--onnx-quant", "matmulnbits",
                  "--out", str(graph), "--overwrite"], log)
        tok = AutoTokenizer.from_pretrained(str(src))
        ids = tok(B.WIKI.read_text()[:20000].replace("\r\n", "\n"), return_tensors="np").input_ids[:, :512]
        ids = ids.astype(np.int64)
        tm = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
        want = B.Loop(tm).prefill(ids).logits[0].numpy()
        for level in (1, 4):
            got = B.Loop(B.ort_model(graph, args.threads, level)).prefill(ids).logits[0].numpy()
            rel = float(np.linalg.norm(got - want) / np.linalg.norm(want))
            row[f"logits_rel_err_level{level}"] = rel
            log(f"{tag}: accuracy_level {level}: logits rel err {rel:.3e}")
        del tm
        t0 = time.perf_counter()
        row.update(CS.evaluate(str(src), 16, 2048))
        row["eval_s"] = round(time.perf_counter() - t0, 1)
        log(f"{tag}: WikiText-2 {row['wikitext2_ppl']:.2f}, C4 {row['c4_ppl']:.2f}")
        result["rows"][tag] = row
        (out / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    md = ["SmolLM2-135M-Instruct 2:4 + int4 g128 sym (calibration of onnx_cpu.py), ONNX Runtime "
          f"{ort.__version__} CPU; logits error of the MatMulNBits graph against the torch compressed model on a "
          "512-token WikiText-2 window; perplexity of the torch compressed model, 16 windows x 2048.", "",
          "| --smooth-alpha | --smooth-lm-head-alpha | logits rel err, level 1 | level 4 | WikiText-2 ppl | C4 ppl |",
          "|---|---|---|---|---|---|"]
    if args.lm_head_alphas:
        md[0] += " Every row with --quantize-lm-head (the lm_head int4 g128, not pruned)."
    for row in sorted(result["rows"].values(), key=lambda r: (r["smooth_alpha"], r.get("smooth_lm_head_alpha", -1))):
        head = "-" if "smooth_lm_head_alpha" not in row else f"{row['smooth_lm_head_alpha']:g}"
        md.append(f"| {row['smooth_alpha']:g} | {head} | {row['logits_rel_err_level1']:.2e} "
                  f"| {row['logits_rel_err_level4']:.2e} | {row['wikitext2_ppl']:.2f} | {row['c4_ppl']:.2f} |")
    (out / f"{name}.md").write_text("\n".join(md) + "\n")
    log("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
