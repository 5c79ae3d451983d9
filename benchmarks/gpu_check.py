"""``python -m benchmarks gpu-check [--budget 480] [--quick] [--out DIR]``: everything a short GPU window should
measure, in one command and inside ``--budget`` seconds (the tests get up to 30% of it, the compress row starts
before 45%, gemm runs until 55%, e2e until 95%): the CUDA tests, the README's compression of a random ~1B Llama on
128 x 2048 random tokens, timed whole, with an ESTIMATE for ~8B from its per-block times (``compress_row``), the
linear shapes that matter (our int4
2:4 and fp16 2:4 kernels, dense cuBLAS, int4 dense tinygemm; eager and CUDA graph; GB/s against the measured copy
bandwidth) and end to end (a ~1B, then a ~8B random Llama built on the GPU in fp16: prefill, decode tokens/s at
batch 1/16/64 eager and compiled static-cache, weights on the device; headline rows first: batch-1 compiled
decode, then prefill 1x2048, ...; the ~1B model gets 40% of the time left, the ~8B the rest). Writes ``gpu_check.json``, ``.md``,
``.png`` and the raw logs (``gpu_check.log``, ``gpu_check_tests.log``) to ``<out>/<device-name>/`` and prints the
tables last. ``--quick`` runs tiny shapes; on a CPU it checks the harness only (no figure there is a GPU figure)."""
from __future__ import annotations

import contextlib
import functools
import io
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from . import serving
from .compress_row import compress_rows, compress_table
from .harness import ROOT, device_name, environment, write_results
from .suites import E2E_MODELS, SHAPES

GEMM_SHAPES = ("8B gate/up_proj", "8B down_proj", "8B q_proj/o_proj")
QUICK_SHAPES = {"tiny gate/up": (256, 128), "tiny down": (128, 256)}


def _plan(cuda: bool, quick: bool) -> dict[str, Any]:
    if quick:
        return {"shapes": QUICK_SHAPES, "tokens": [1, 16] if not cuda else [1, 16, 2048],
                "models": {"tiny": E2E_MODELS["tiny"]},
                "e2e": {"prefill": [(1, 64)], "decode": [1], "new_tokens": 4, "repeat": 2},
                "compress": {"model": "tiny", "config": E2E_MODELS["tiny"], "nsamples": 4, "seqlen": 64},
                "tests": ["tests/test_cuda.py"]}
    return {"shapes": {k: SHAPES[k] for k in GEMM_SHAPES}, "tokens": [1, 16, 64, 2048],
            "models": {k: E2E_MODELS[k] for k in ("llama-1B", "llama-8B")},
            "e2e": {"prefill": [(1, 2048), (8, 512)], "decode": [1, 16, 64], "new_tokens": 128, "repeat": 3},
            "compress": {"model": "llama-1B", "config": E2E_MODELS["llama-1B"], "nsamples": 128, "seqlen": 2048,
                         "large": E2E_MODELS["llama-8B"]},
            "tests": ["tests/test_cuda.py", "tests/test_kernels.py"]}


def _decoded(out: str | bytes | None) -> str:
    return out.decode(errors="replace") if isinstance(out, bytes) else (out or "")


def run_tests(files: list[str], limit: float, log: Path) -> dict[str, Any]:
    """The CUDA tests in a subprocess, cut at ``limit`` seconds; the raw output goes to ``log``."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files]
    t0, limit = time.monotonic(), max(5.0, limit)
    try:
        out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=limit)
        text, rc = out.stdout + out.stderr, out.returncode
    except subprocess.TimeoutExpired as e:  # its output may come as bytes even with text=True
        text, rc = f"{_decoded(e.stdout)}{_decoded(e.stderr)}\n(cut at {limit:.0f} s)", -1
    log.write_text(f"$ {' '.join(cmd)}\n{text}")
    last = [line for line in str(text).strip().splitlines() if line.strip()][-1:] or ["(no output)"]
    return {"command": " ".join(cmd[1:]), "rc": rc, "summary": last[0], "wall_s": round(time.monotonic() - t0, 1)}


def check(device: str, quick: bool, budget: float, folder: Path) -> dict[str, Any]:
    cuda = device.startswith("cuda")
    plan = _plan(cuda, quick)
    start = time.monotonic()
    res: dict[str, Any] = {"suite": "gpu_check", "env": environment(device), "quick": quick, "budget_s": budget}
    print(f"== tests ({', '.join(plan['tests'])})", flush=True)
    res["tests"] = run_tests(plan["tests"], 0.30 * budget, folder / "gpu_check_tests.log")
    print(f"   {res['tests']['summary']}", flush=True)
    print("== compress", flush=True)
    res["compress"] = compress_rows(device, plan["compress"], start + 0.45 * budget)
    print("   " + "\n   ".join(compress_table(res)[2:]), flush=True)
    print("== gemm", flush=True)
    cpu_variant = None if cuda else "torch"
    res["gemm"] = serving.gemm_rows(device, plan["shapes"], plan["tokens"], start + 0.55 * budget, cpu_variant)
    print("== e2e", flush=True)
    res["e2e"] = serving.e2e_rows(device, plan["models"], plan["e2e"], start + 0.95 * budget, cpu_variant)
    res["wall_s"] = round(time.monotonic() - start, 1)
    if not cuda:
        res["note"] = "CPU: a harness check (packed layers by the pure-torch reference); not GPU figures"
    return res


def _t(cell: dict) -> tuple[str, dict]:
    """The timing a cell is compared by: CUDA-graph replay where there is one, else eager."""
    return ("graph", cell["graph"]) if "graph" in cell else ("eager", cell["eager"])


def gemm_table(res: dict) -> list[str]:
    g = res["gemm"]
    lines = [f"gemm on {res['env']['device_name']}: ms per call (CUDA-graph replay where CUDA, else eager); x = dense "
             f"time / variant time; GB/s = weight bytes / time, copy bandwidth {g['copy_bandwidth_gb_s']:.0f} GB/s", "",
             "| shape | M | " + " | ".join(f"{v} ms | x dense" for v in serving.GEMM_VARIANTS) + " | int4 2:4 GB/s (% copy) |",
             "|---|---|" + "---|---|" * len(serving.GEMM_VARIANTS) + "---|"]
    for r in g["rows"]:
        if "skipped" in r:
            lines.append(f"| {r['shape']} | {r['tokens']} | skipped: {r['skipped']} |")
            continue
        base = _t(r["dense"])[1]["median_ms"] if "eager" in r["dense"] else None
        cells = [r["shape"], str(r["tokens"])]
        for v in serving.GEMM_VARIANTS:
            c = r.get(v, {})
            if "eager" not in c:
                cells += [f"skipped: {c.get('skipped', '-')[:80]}", ""]
                continue
            t = _t(c)[1]["median_ms"]
            cells += [f"{t:.4f}", f"{base / t:.2f}" if base else "-"]
        c = r.get("int4 2:4", {})
        cells.append(f"{c['graph_gb_s']:.0f} ({100 * c['graph_fraction_of_copy_bw']:.0f}%)" if "graph_gb_s" in c else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


E2E_COLUMNS = ("prefill_1x2048", "prefill_8x512", "prefill_1x64", "decode_b1_eager", "decode_b1_compiled",
               "decode_b16_eager", "decode_b16_compiled", "decode_b64_eager", "decode_b64_compiled",
               "decode_b2_eager", "decode_b2_compiled")


def _e2e_cell(r: dict, dense: dict, key: str) -> str:
    c = r.get(key)
    if c is None:
        return None
    if "median_ms" not in c:
        return "skipped: " + c["skipped"][:60]
    d = dense.get(key, {})
    if key.startswith("decode"):
        x = f" ({c['tokens_per_s'] / d['tokens_per_s']:.2f}x)" if "tokens_per_s" in d else ""
        return f"{c['tokens_per_s']:.1f} tok/s{x}"
    x = f" ({d['median_ms'] / c['median_ms']:.2f}x)" if "median_ms" in d else ""
    return f"{c['median_ms']:.2f} ms{x}"


def e2e_table(res: dict) -> list[str]:
    lines = [f"e2e on {res['env']['device_name']}: random Llama, 2:4 on the int4 g128 grid, fp16 (tinygemm bf16); "
             "(x) = against dense fp16 in the same mode"]
    for row in res["e2e"]:
        if "skipped" in row:
            lines += ["", f"{row['model']}: skipped: {row['skipped']}"]
            continue
        cols = [k for k in E2E_COLUMNS if any(k in row.get(v, {}) for v in serving.E2E_VARIANTS)]
        lines += ["", f"{row['model']} ({row['parameters'] / 1e9:.2f} B parameters)", "",
                  "| variant | weights GiB | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
        dense = row.get("dense", {})
        for v in serving.E2E_VARIANTS:
            r = row.get(v, {})
            if "weights_gib" not in r:
                lines.append(f"| {v} | skipped: {r.get('skipped', '-')[:120]} |" + " |" * len(cols))
                continue
            lines.append(f"| {v} | {r['weights_gib']:.2f} | " + " | ".join(_e2e_cell(r, dense, k) or "" for k in cols)
                         + " |")
    return lines


def table(res: dict) -> list[str]:
    t = res["tests"]
    head = [f"gpu-check on {res['env']['device_name']} ({'quick, ' if res['quick'] else ''}budget {res['budget_s']:.0f} s, "
            f"took {res['wall_s']:.0f} s)", "", f"tests: `{t['command']}`: {t['summary']} (exit {t['rc']})", ""]
    return head + compress_table(res) + [""] + gemm_table(res) + [""] + e2e_table(res) + ([f"", f"note: {res['note']}"] if "note" in res else [])


def draw(res: dict, path: Path) -> None:
    """The gemm ratios against dense and the batch-1 decode rates, as a PNG."""
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    rows = [r for r in res["gemm"]["rows"] if "skipped" not in r and "eager" in r["dense"]]
    for v, style in zip(serving.GEMM_VARIANTS[1:], ("--x", "-s", "-o")):
        for shape in dict.fromkeys(r["shape"] for r in rows):
            pts = [(r["tokens"], _t(r["dense"])[1]["median_ms"] / _t(r[v])[1]["median_ms"]) for r in rows
                   if r["shape"] == shape and "eager" in r.get(v, {})]
            if pts:
                a.plot(*zip(*pts), style, label=f"{v} {shape}")
    a.axhline(1.0, color="gray", lw=0.8)
    a.set_xscale("log", base=2)
    a.set(title="gemm: x dense fp16", xlabel="tokens M")
    a.legend(fontsize=6)
    labels, vals = [], []
    for row in res["e2e"]:
        for v in serving.E2E_VARIANTS:
            c = row.get(v, {}).get("decode_b1_compiled") or row.get(v, {}).get("decode_b1_eager") or {}
            if "tokens_per_s" in c:
                labels.append(f"{row['model']}\n{v}")
                vals.append(c["tokens_per_s"])
    b.bar(range(len(vals)), vals)
    b.set_xticks(range(len(vals)), labels, fontsize=6, rotation=45, ha="right")
    b.set(title="decode batch 1 (compiled where CUDA), tokens/s")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


class _Tee(io.TextIOBase):
    def __init__(self, *streams):
        self.streams = streams

    def write(self, s: str) -> int:
        for st in self.streams:
            st.write(s)
            st.flush()
        return len(s)


def main(device: str, quick: bool, budget: float, out: Path) -> int:
    folder = Path(out) / device_name(device)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "gpu_check.log", "w") as log, contextlib.redirect_stdout(_Tee(sys.stdout, log)):
        res = check(device, quick, budget, folder)
        lines = table(res)
        try:
            write_results("gpu_check", device, res, lines, Path(out), functools.partial(draw, res))
        except ValueError as e:  # a figure that is not finite: keep the window's run, marked, rather than lose it
            res["invalid"] = str(e)
            (folder / "gpu_check.unchecked.json").write_text(json.dumps(res, indent=1, default=str) + "\n")
            (folder / "gpu_check.md").write_text("\n".join(lines + ["", f"INVALID: {e}"]) + "\n")
            print("\n" + "\n".join(lines + ["", f"INVALID: {e}; everything is in {folder}/gpu_check.unchecked.json"]))
            return 1
        print("\n" + "\n".join(lines + ["", f"(written to {folder}/gpu_check.json/.md/.png and the raw logs)"]))
    return 0 if res["tests"]["rc"] in (0, 5) else 1
