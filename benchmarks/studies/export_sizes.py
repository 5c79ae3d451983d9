"""Benchmark: bytes on disk of SmolLM2-135M per export format, beside the theoretical sizes, and a check that
each export loads through its route (transformers with sparse24, transformers with compressed-tensors, plain
dense) and generates the same greedy tokens.

Sizes depend only on shapes, so the compressions here use a small calibration (16 x 512 of the fixed C4
tokens); accuracy is `compress_smollm2.py`'s job.

    python -m benchmarks.studies.export_sizes [--out benchmarks/results]

Writes ``<out>/export_sizes.json`` and ``.md``; the raw log goes to stdout.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.protocol import CALIB, RESULTS
PROMPT = "The capital of France is"


def sh(*args: str) -> None:
    cmd = [sys.executable, "-m", "sparsegpt_export", *args]
    print("$ sparsegpt-export " + " ".join(args), flush=True)
    subprocess.run(cmd, check=True)


def layer_bytes(folder: Path, layers: set[str]) -> tuple[int, int]:
    """(bytes of the compressed layers' tensors, bytes of everything else) in the folder's safetensors files."""
    from safetensors import safe_open

    mine = other = 0
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as sf:
            for k in sf.keys():
                t = sf.get_slice(k)
                n = math.prod(t.get_shape()) * {"F16": 2, "BF16": 2, "F32": 4, "U8": 1, "I8": 1, "I16": 2,
                                                 "I32": 4, "I64": 8}[t.get_dtype()]
                if k.rpartition(".")[0] in layers:
                    mine += n
                else:
                    other += n
    return mine, other


def greedy(folder: Path, tok_dir: Path) -> tuple[str, float]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import sparsegpt_export  # noqa: F401  (registers the sparse24 loader)

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    load_s = time.perf_counter() - t0
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    ids = tok(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=12, do_sample=False)
    return tok.decode(out[0][ids.shape[1]:]), load_s


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--nsamples", type=int, default=16)
    args = ap.parse_args()
    from sparsegpt_export.io import load_records

    work = Path(tempfile.mkdtemp(prefix="sizes-"))
    cq, cf = work / "c-2of4-w4", work / "c-2of4-fp"
    common = ["--dataset", str(CALIB), "--nsamples", str(args.nsamples), "--seqlen", "512", "--no-progress"]
    sh("compress", "smollm2-135m", "--pattern", "2:4", "--bits", "4", "--group-size", "128", "--sym", *common,
       "--out", str(cq))
    sh("compress", "smollm2-135m", "--pattern", "2:4", "--bits", "none", *common, "--out", str(cf))
    exports = {
        "dense fp16": (cq, "dense"),
        "sparse24 int4 2:4 (+fp16 rest)": (cq, "sparse24"),
        "compressed-tensors W4A16 (+fp16 rest)": (cq, "compressed-tensors"),
        "sparse24 fp16 2:4, CUTLASS layout (+fp16 rest)": (cf, "sparse24"),
    }
    records = load_records(cq)
    layers = set(records)
    numel = sum(r.shape[0] * r.shape[1] for r in records.values())
    scale_bytes = sum(r.scales.numel() * r.scales.element_size() for r in records.values())
    # compressed-tensors writes the groups at gcd(128, 576, 1536) = 64: each scale twice, the last group once
    ct_scale_bytes = sum(r.shape[0] * (r.shape[1] // 64) * 2 for r in records.values())
    theory = {
        "dense fp16": numel * 2,
        "sparse24 int4 2:4 (+fp16 rest)": numel // 2 * (4 + 2) // 8 + scale_bytes,
        "compressed-tensors W4A16 (+fp16 rest)": numel * 4 // 8 + ct_scale_bytes,
        "sparse24 fp16 2:4, CUTLASS layout (+fp16 rest)": numel // 2 * 2 + numel // 2 * 2 // 8,
    }
    rows = []
    texts = {}
    for label, (src, fmt) in exports.items():
        out = work / fmt.replace(" ", "_") / src.name
        sh("export", str(src), "--format", fmt, "--out", str(out))
        files = {f.name: f.stat().st_size for f in sorted(out.iterdir()) if f.is_file()}
        mine, other = layer_bytes(out, layers)
        text, load_s = greedy(out, src)
        texts.setdefault(src.name, set()).add(text)
        rows.append({"format": label, "layer_bytes": mine, "theoretical_layer_bytes": theory[label],
                     "layer_bytes_vs_theory": round(mine / theory[label], 4), "other_tensor_bytes": other,
                     "total_bytes_on_disk": sum(files.values()), "files": files,
                     "from_pretrained_s": round(load_s, 2), "greedy_continuation": text})
        print(json.dumps(rows[-1]), flush=True)
    dense_total = rows[0]["total_bytes_on_disk"]
    for r in rows:
        r["total_vs_dense_fp16"] = round(r["total_bytes_on_disk"] / dense_total, 4)
    result = {
        "model": "SmolLM2-135M-Instruct", "compressed_layers": len(layers), "compressed_weights": numel,
        "scale_bytes_g128_fp16": scale_bytes, "calibration": f"{args.nsamples} x 512 fixed C4 tokens",
        "machine": f"{platform.machine()} {os.cpu_count()} cores", "prompt": PROMPT,
        "same_greedy_tokens_per_compress_output": all(len(v) == 1 for v in texts.values()), "rows": rows,
    }
    outdir = Path(args.out)
    outdir.mkdir(parents=True, exist_ok=True)
    (outdir / "export_sizes.json").write_text(json.dumps(result, indent=1) + "\n")
    md = [f"SmolLM2-135M-Instruct: {len(layers)} compressed linears, {numel / 1e6:.1f} M weights; "
          f"bytes on disk per export format (`python -m benchmarks.studies.export_sizes`)", "",
          "| format | compressed layers, bytes | theoretical | ratio | other tensors, bytes | total on disk | vs dense fp16 |",
          "|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['format']} | {r['layer_bytes']:,} | {r['theoretical_layer_bytes']:,} | "
                  f"{r['layer_bytes_vs_theory']:.3f} | {r['other_tensor_bytes']:,} | {r['total_bytes_on_disk']:,} | "
                  f"{r['total_vs_dense_fp16']:.3f} |")
    md += ["", "Theoretical: fp16 dense = 2 B per weight; int4 2:4 = 4-bit code + 2-bit position per kept weight "
           "+ float16 scales per 128 columns; W4A16 = 4 bits per weight + scales per 64 columns; fp16 2:4 = "
           "2 B per kept value + 2 bits of metadata per kept value.",
           f"Greedy continuation of {PROMPT!r} (12 tokens), identical across the exports of one compress output: "
           f"{result['same_greedy_tokens_per_compress_output']}; 2:4 + int4: {rows[0]['greedy_continuation']!r}, "
           f"2:4 fp16: {rows[-1]['greedy_continuation']!r}"]
    (outdir / "export_sizes.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
