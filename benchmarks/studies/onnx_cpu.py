"""Benchmark: SmolLM2-135M 2:4 + 4-bit as ONNX graphs in ONNX Runtime on CPU, against the float32 graph and torch.

    python -m benchmarks.studies.onnx_cpu [--threads 2] [--repeats 5] [--decode 64] [--smooth-alpha auto|A] [--onnx-graph gqa|traced]
                                  [--accuracy-level L] [--work DIR] [--out DIR]

1. compress (unless ``--work`` already holds the outputs, made with the same options): SmolLM2-135M-Instruct to 2:4 +
   4-bit g128 symmetric on the fixed calibration tokens (``calib-smollm2-c4-128x512.safetensors``, 128 x 512),
   by default as the README's default compress command does (``--smooth-alpha auto``: smoothed at 0.6; ``0``: not
   smoothed; ``A``: at A), once as is and
   once with ``--quantize-lm-head``;
2. export three graphs with the CLI (``--onnx-graph gqa`` unless told otherwise), with the export's default
   ``--accuracy-level`` unless ``--accuracy-level`` is given: ``--onnx-quant none`` (float32, the baseline),
   ``matmulnbits`` (float lm_head) and ``matmulnbits`` of the ``--quantize-lm-head`` output;
3. sizes: the initializers of the compressed layers against their float32 bytes;
4. parity against the torch compressed model (float32): logits of a 512-token WikiText-2 window with the
   MatMulNBits nodes set to accuracy_level 0, 1 and 4, and as exported; greedy generation of 32 tokens; perplexity
   on WikiText-2 (16 windows x 2048) of torch and of the graphs as exported;
5. speed, ONNX Runtime and torch on ``--threads`` threads: ``--decode`` greedy new tokens after a short prompt and
   after the 512-token window, each through ``model.generate`` (what users run) and through the bare loop (prefill,
   then one forward per token with the KV cache, as many forwards as generate makes), for every graph (with
   ``--torch-speed`` the torch model too, short prompt only); all runs interleaved round-robin per repeat so that other load on the machine hits every
   variant alike (``uptime`` logged before and after), median and spread (min, max) over ``--repeats`` after one
   warm-up round. tok/s include the prefill; generate()'s overhead per token = (its wall time - the loop's) / tokens.

Writes ``<out>/onnx_cpu.json``, ``.md`` and ``.log`` (everything printed); ``onnx_cpu_traced.*`` with
``--onnx-graph traced``, ``onnx_cpu_fused.*`` with ``--ort-fusions``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.protocol import CALIB, RESULTS, WIKI
SHORT_PROMPT = "The capital of France is"  # the short prompt of the speed runs
COMPRESS = ["--pattern", "2:4", "--bits", "4", "--group-size", "128", "--sym", "--dataset", str(CALIB),
            "--nsamples", "128", "--seqlen", "512", "--seed", "0", "--device", "cpu"]


class Log:
    def __init__(self, path: Path):
        self.f = open(path, "w")

    def __call__(self, msg: str = "") -> None:
        print(msg, flush=True)
        self.f.write(msg + "\n")
        self.f.flush()


def sh(cmd: list[str], log: Log) -> float:
    log("$ " + " ".join(str(c) for c in cmd[1:] if c))
    t0 = time.perf_counter()
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log("\n".join(line for line in p.stdout.splitlines() if "Loading weights" not in line and line.strip())[-3000:])
    if p.returncode != 0:
        raise RuntimeError(f"failed ({p.returncode}): {' '.join(map(str, cmd))}")
    return time.perf_counter() - t0


def stats(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "runs": xs}


def compressed_bytes(path: Path) -> dict:
    """Initializer bytes of the MatMulNBits nodes (a packed node holds several layers), against the float32 bytes of
    their [N, K] weights."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    sizes = {}
    for t in proto.graph.initializer:
        n = int(np.prod(t.dims)) if t.dims else 1
        bits = {onnx.TensorProto.UINT8: 8, onnx.TensorProto.FLOAT: 32, onnx.TensorProto.INT4: 4,
                onnx.TensorProto.UINT4: 4}.get(t.data_type, 32)
        sizes[t.name] = n * bits // 8
    q = f = 0
    nodes = 0
    for node in proto.graph.node:
        if node.op_type == "MatMulNBits":
            a = {x.name: x.i for x in node.attribute}
            q += sum(sizes[i] for i in node.input[1:] if i)
            f += 4 * a["K"] * a["N"]
            nodes += 1
    return {"matmulnbits_nodes": nodes, "initializer_bytes": q, "float32_bytes": f, "ratio": q / f if f else None}


def session(path: Path, threads: int, level: int | None = None):
    """An ONNX Runtime session; ``level`` rewrites every MatMulNBits' accuracy_level in memory first."""
    import onnx
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    if level is None:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    from sparsegpt_export.converters.onnx import set_accuracy_level

    proto = onnx.load(str(path))
    set_accuracy_level(proto, level)
    return ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def ort_model(graph_dir: Path, threads: int, level: int | None = None):
    """`OnnxCausalLM` over the graph (KV buffers shared in place for the gqa graph, as users get it); ``level``
    rewrites every MatMulNBits' accuracy_level in memory first."""
    from sparsegpt_export.onnx import OnnxCausalLM

    model = OnnxCausalLM.from_pretrained(graph_dir, num_threads=threads)
    if level is not None:
        model.session = session(graph_dir / "model.onnx", threads, level)
    return model


class Loop:
    """Prefill, then greedy decode one token per forward with the KV cache: torch or `OnnxCausalLM` alike (the bare
    loop, no `generate`)."""

    def __init__(self, model):
        self.m = model
        self.next = None  # the token the last decode step predicted
        self.prefill_s = 0.0  # how long the last `greedy` call's prefill took

    @torch.no_grad()
    def prefill(self, ids: np.ndarray):
        from transformers import DynamicCache

        return self.m(input_ids=torch.from_numpy(ids), past_key_values=DynamicCache(), use_cache=True)

    @torch.no_grad()
    def decode(self, out, steps: int, start: int) -> list[int]:
        tokens = []
        tok = int(out.logits[0, -1].argmax())
        cache = out.past_key_values
        for i in range(steps):
            tokens.append(tok)
            out = self.m(input_ids=torch.tensor([[tok]]), past_key_values=cache, use_cache=True,
                         position_ids=torch.tensor([[start + i]]))
            cache = out.past_key_values
            tok = int(out.logits[0, -1].argmax())
        self.next = tok
        return tokens

    def greedy(self, ids: np.ndarray, n: int) -> list[int]:
        """``n`` new tokens with as many forwards as ``generate(max_new_tokens=n)`` makes: the prefill, then n - 1
        decode steps."""
        t0 = time.perf_counter()
        out = self.prefill(ids)
        self.prefill_s = time.perf_counter() - t0
        return self.decode(out, n - 1, ids.shape[1]) + [self.next]


class Gen:
    """What users run: ``model.generate`` (greedy, exactly ``n`` new tokens, the prefill included)."""

    def __init__(self, model):
        self.m = model

    @torch.no_grad()
    def greedy(self, ids: np.ndarray, n: int) -> list[int]:
        t = torch.from_numpy(ids)
        out = self.m.generate(t, attention_mask=torch.ones_like(t), max_new_tokens=n,
                              do_sample=False, pad_token_id=self.m.generation_config.eos_token_id)
        return out[0, ids.shape[1]:].tolist()


def uptime() -> str:
    """The machine's load (``uptime``), for the raw log: other work on the machine slows every variant."""
    try:
        return subprocess.run(["uptime"], stdout=subprocess.PIPE, text=True).stdout.strip()
    except OSError:
        return "uptime: unavailable"


def speed(plan: dict, n: int, repeats: int, log: Log) -> dict:
    """Every (model, prompt, loop or generate) in turn, round-robin per repeat so that a slow spell of the machine hits
    them all alike; wall time of ``n`` new tokens (prefill included) per run, the first round a warm-up. Also checks
    that the loop and ``generate`` give the same tokens. ``plan``: name -> (model, {prompt name: ids})."""
    runs = {}
    for name, (model, prompts) in plan.items():
        for pname, ids in prompts.items():
            runs[f"{name}|{pname}|loop"] = (Loop(model), ids)
            runs[f"{name}|{pname}|generate"] = (Gen(model), ids)
    wall = {k: [] for k in runs}
    prefill = {k: [] for k in runs if k.endswith("|loop")}
    same = {}
    log(f"load before the speed runs: {uptime()}")
    for rep in range(repeats + 1):
        line = []
        for key, (runner, ids) in runs.items():
            t0 = time.perf_counter()
            tokens = runner.greedy(ids, n)
            dt = time.perf_counter() - t0
            line.append(f"{key} {1000 * dt / n:.2f} ms/token")
            if rep == 0:
                same.setdefault(key.rsplit("|", 1)[0], []).append(tokens)
                continue
            wall[key].append(dt)
            if key in prefill:
                prefill[key].append(runner.prefill_s)
        log(f"repeat {rep}{' (warm-up)' if rep == 0 else ''}: " + "; ".join(line))
    log(f"load after the speed runs: {uptime()}")
    return {"wall_s": wall, "prefill_s": prefill, "loop_equals_generate": {k: v[0] == v[1] for k, v in same.items()}}


def summarize(raw: dict, n: int) -> dict:
    """Per model and prompt: tok/s of the loop and of ``generate`` (median and spread), the loop's prefill and
    decode-only speed, and ``generate``'s overhead per token (median of the per-repeat differences, ms)."""
    rows = {}
    for key, ws in raw["wall_s"].items():
        name, pname, mode = key.split("|")
        row = rows.setdefault(f"{name}|{pname}", {"model": name, "prompt": pname})
        row[f"{mode}_tok_s"] = stats([n / w for w in ws])
        row[f"{mode}_ms_per_token"] = stats([1000 * w / n for w in ws])
        if mode == "loop":
            pre = raw["prefill_s"][key]
            row["prefill_ms"] = stats([1000 * p for p in pre])
            row["loop_decode_tok_s"] = stats([(n - 1) / (w - p) for w, p in zip(ws, pre)])
    for key, row in rows.items():
        g, lo = raw["wall_s"][key + "|generate"], raw["wall_s"][key + "|loop"]
        row["generate_overhead_ms_per_token"] = stats([1000 * (a - b) / n for a, b in zip(g, lo)])
        row["loop_equals_generate"] = raw["loop_equals_generate"][key]
    return rows


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--prefill", type=int, default=512, help="the long prompt's tokens (WikiText-2), default 512")
    ap.add_argument("--decode", type=int, default=64, help="new tokens per speed run (default 64)")
    ap.add_argument("--ppl-windows", type=int, default=16)
    ap.add_argument("--smooth-alpha", type=_alpha, default=None,
                    help="compress with --smooth-alpha (default auto: compress's own default, the README's command; 0: "
                         "none); see benchmarks/studies/onnx_smoothing.py")
    ap.add_argument("--smooth-lm-head-alpha", type=float, default=None,
                    help="the --quantize-lm-head model's --smooth-lm-head-alpha (default: compress's own default)")
    ap.add_argument("--accuracy-level", default=None,
                    help="export with this --accuracy-level (default: the export's own default)")
    ap.add_argument("--work", default=None,
                    help="work folder (default ~/.cache/sparsegpt-export/bench-onnx, -smooth<alpha> with an explicit alpha); "
                         "compress outputs already in <work>/c-plain and <work>/c-lmhead made with the same options are "
                         "reused")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--ort-fusions", action="store_true",
                    help="export the graphs with --ort-fusions cpu (into <work>/<graph>-fused; results onnx_cpu_fused.*)")
    ap.add_argument("--onnx-graph", choices=["gqa", "traced"], default="gqa",
                    help="which graph to export (default gqa; traced: into <work>/<graph>-traced, results onnx_cpu_traced.*)")
    ap.add_argument("--skip-ppl", action="store_true", help="leave out the perplexity section")
    ap.add_argument("--torch-speed", action="store_true", help="time the torch model (eager) too, short prompt only")
    ap.add_argument("--reuse-exports", action="store_true",
                    help="keep the graphs already in --work (made by this script's export commands) instead of re-exporting")
    return ap.parse_args()


def _alpha(v: str):
    return None if v == "auto" else float(v)


def _smoothing_text(alpha) -> str:
    if alpha is None:
        return "the default compress: --smooth-alpha auto"
    return f"--smooth-alpha {alpha:g}" if alpha else "no smoothing (--smooth-alpha 0)"


def compress_outputs(args, work: Path, log: Log) -> tuple[dict, set]:
    """The plain and the ``--quantize-lm-head`` compress outputs in ``work`` (made unless there with these options),
    and which of them this run made."""
    src = {"plain": work / "c-plain", "lmhead": work / "c-lmhead"}
    alpha, head = args.smooth_alpha, args.smooth_lm_head_alpha
    smooth = ["--smooth-alpha", str(alpha)] if alpha is not None else []
    head_flags = ["--smooth-lm-head-alpha", str(head)] if head is not None else []
    fresh = set()
    for key, extra, want in (("plain", [], {}), ("lmhead", ["--quantize-lm-head", *head_flags],
                                                 {"quantize_lm_head": True, "smooth_lm_head_alpha": head})):
        cfg = src[key] / "sparsegpt_config.json"
        have = json.loads(cfg.read_text()) if cfg.is_file() else None
        if have is None or have.get("smooth_alpha") != alpha or any(have.get(k) != v for k, v in want.items()):
            sh([sys.executable, "-m", "sparsegpt_export", "compress", "smollm2-135m", *COMPRESS, *smooth, *extra,
                "--out", str(src[key]), "--overwrite", "--no-progress"], log)
            fresh.add(key)
        else:
            log(f"reusing {src[key]}")
    return src, fresh


def export_graphs(args, src: dict, fresh: set, work: Path, log: Log, result: dict) -> dict:
    """The three graphs (float32, int4, int4 with the lm_head), exported with the CLI's defaults unless told."""
    graphs = {"onnx-float32": (src["plain"], "none"), "onnx-int4": (src["plain"], "matmulnbits"),
              "onnx-int4-lmhead4": (src["lmhead"], "matmulnbits")}
    graph_kind = "traced" if args.ort_fusions else args.onnx_graph
    fused = ["--ort-fusions", "cpu"] if args.ort_fusions else []
    suffix = "-fused" if args.ort_fusions else {"gqa": "", "traced": "-traced"}[graph_kind]
    level = ["--accuracy-level", str(args.accuracy_level)] if args.accuracy_level is not None else []
    result["export_s"] = {}
    for name, (s, q) in graphs.items():
        if args.reuse_exports and s not in {src[k] for k in fresh} \
                and (work / (name + suffix) / "sparsegpt_onnx.json").is_file():
            log(f"reusing {work / (name + suffix)}")
            continue
        cmd = [sys.executable, "-m", "sparsegpt_export", "export", str(s), "--format", "onnx", "--onnx-quant", q,
               "--onnx-graph", graph_kind, *fused, *(level if q == "matmulnbits" else []), "--out",
               str(work / (name + suffix)), "--overwrite"]
        result["export_s"][name] = round(sh(cmd, log), 1)
    out = {name: work / (name + suffix) for name in graphs}
    result["accuracy_levels"] = {name: json.loads((d / "sparsegpt_onnx.json").read_text()).get("accuracy_level")
                                 for name, d in out.items()}
    log(f"accuracy_level of the exported graphs: {result['accuracy_levels']}")
    return out


def sizes(work_graph: dict, log: Log) -> dict:
    out = {}
    for name, d in work_graph.items():
        files = {f.name: f.stat().st_size for f in d.iterdir() if f.name.startswith("model.onnx")}
        entry = {"files": files}
        if name != "onnx-float32":
            entry["compressed_layers"] = compressed_bytes(d / "model.onnx")
        out[name] = entry
        log(f"{name}: files {files} {entry.get('compressed_layers', '')}")
    return out


def parity(torch_models: dict, work_graph: dict, ids: np.ndarray, threads: int, log: Log) -> dict:
    """Logits of the long prompt and greedy 32 tokens against torch, with every MatMulNBits node set to
    accuracy_level 0, 1 and 4, and as exported ("default")."""
    out = {}
    prompt = ids[:, :64]
    for name, key in (("onnx-int4", "plain"), ("onnx-int4-lmhead4", "lmhead")):
        tl = Loop(torch_models[key])
        want = tl.prefill(ids).logits[0].numpy()
        want_gen = tl.decode(tl.prefill(prompt), 32, prompt.shape[1])
        for level in (0, 1, 4, None):
            loop = Loop(ort_model(work_graph[name], threads, level))
            got = loop.prefill(ids).logits[0].numpy()
            rel = float(np.linalg.norm(got - want) / np.linalg.norm(want))  # ||diff|| / ||torch||, all logits
            rel_max = float(np.abs(got - want).max() / np.abs(want).max())  # the worst logit, for the record
            gen = loop.decode(loop.prefill(prompt), 32, prompt.shape[1])
            first_diff = next((i for i, (a, b) in enumerate(zip(want_gen, gen)) if a != b), None)
            label = "default" if level is None else f"level{level}"
            out[f"{name}@{label}"] = {"logits_rel_err": rel, "logits_maxabs_rel_err": rel_max,
                                      "greedy32_identical": gen == want_gen, "first_differing_token": first_diff}
            log(f"parity {name} accuracy_level {label}: logits rel err {rel:.3g} (max-abs {rel_max:.3g}), "
                f"greedy 32 identical {gen == want_gen} (first difference at {first_diff})")
    return out


def perplexities(torch_models: dict, work_graph: dict, tok, text: str, args, log: Log) -> dict:
    """WikiText-2 perplexity of torch and of the graphs as exported."""
    from sparsegpt_export.evaluation import perplexity
    from sparsegpt_export.onnx import OnnxCausalLM

    out = {}
    for key, name in (("plain", "onnx-int4"), ("lmhead", "onnx-int4-lmhead4")):
        t0 = time.perf_counter()
        pt = perplexity(torch_models[key], tok, text, seqlen=2048, windows=args.ppl_windows, device="cpu")
        t1 = time.perf_counter()
        om = OnnxCausalLM.from_pretrained(work_graph[name], num_threads=args.threads)
        po = perplexity(om, tok, text, seqlen=2048, windows=args.ppl_windows, device="cpu")
        t2 = time.perf_counter()
        out[key] = {"torch": pt["ppl"], "onnx": po["ppl"], "rel_diff": po["ppl"] / pt["ppl"] - 1,
                    "windows": pt["windows"], "seqlen": 2048, "torch_s": round(t1 - t0, 1), "onnx_s": round(t2 - t1, 1)}
        log(f"perplexity wikitext2 {key}: torch {pt['ppl']:.4f}, {name} {po['ppl']:.4f} "
            f"({100 * (po['ppl'] / pt['ppl'] - 1):+.3f}%)")
    return out


def speed_table(rows: dict, prompt: str, base: str = "onnx-float32") -> list[str]:
    md = ["| variant | generate() tok/s | bare loop tok/s | generate() overhead, ms/token | generate() vs float32 ONNX "
          "| bare loop vs float32 ONNX | loop prefill ms | loop decode-only tok/s | same tokens |",
          "|---|---|---|---|---|---|---|---|---|"]
    f = lambda s, d=1: f"{s['median']:.{d}f} ({s['min']:.{d}f}-{s['max']:.{d}f})"  # noqa: E731
    b = rows.get(f"{base}|{prompt}")
    for key, r in rows.items():
        if r["prompt"] != prompt:
            continue
        g = r["generate_tok_s"]["median"] / b["generate_tok_s"]["median"] if b else float("nan")
        lo = r["loop_tok_s"]["median"] / b["loop_tok_s"]["median"] if b else float("nan")
        md.append(f"| {r['model']} | {f(r['generate_tok_s'])} | {f(r['loop_tok_s'])} | "
                  f"{f(r['generate_overhead_ms_per_token'], 2)} | **{g:.2f}x** | {lo:.2f}x | {f(r['prefill_ms'])} | "
                  f"{f(r['loop_decode_tok_s'])} | {r['loop_equals_generate']} |")
    return md


def write_report(result: dict, args, out_dir: Path, stem: str, log: Log) -> None:
    import onnxruntime as ort

    (out_dir / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    alpha, head = args.smooth_alpha, args.smooth_lm_head_alpha
    smoothing = _smoothing_text(alpha) + (
        f", the lm_head model --smooth-lm-head-alpha {head:g}" if head is not None else "")
    md = [f"SmolLM2-135M-Instruct 2:4 + int4 g128 sym ({smoothing}), ONNX Runtime {ort.__version__} CPU, "
          f"{args.threads} threads, {result['onnx_graph']} graph; accuracy_level as exported: "
          f"{result['accuracy_levels']}; median (min-max) of {args.repeats} runs after a warm-up, all variants "
          f"interleaved; {args.decode} new tokens per run, greedy, the prefill included in every tok/s except "
          "'decode-only'.", ""]
    for prompt, label in (("short", f"short prompt ({result['short_prompt_tokens']} tokens)"),
                          ("long", f"{args.prefill}-token prompt")):
        md += [f"Through `generate()` and the bare loop, {label}:", "", *speed_table(result["speed"], prompt), ""]
    md += ["| graph | compressed-layer initializers | their float32 bytes | ratio |", "|---|---|---|---|"]
    for name, s in result["sizes"].items():
        c = s.get("compressed_layers")
        if c:
            md.append(f"| {name} | {c['initializer_bytes']:,} ({c['matmulnbits_nodes']} MatMulNBits) | "
                      f"{c['float32_bytes']:,} | {c['ratio']:.4f} |")
    md += ["", "| parity vs torch | logits rel err ‖Δ‖/‖torch‖ (512 tokens) | worst logit: max\\|Δ\\|/max\\|torch\\| | "
               "greedy 32 tokens identical |", "|---|---|---|---|"]
    for k, v in result["parity"].items():
        md.append(f"| {k} | {v['logits_rel_err']:.3g} | {v['logits_maxabs_rel_err']:.3g} | {v['greedy32_identical']} |")
    windows = next(iter(result["perplexity"].values()), {}).get("windows", args.ppl_windows)
    md += ["", f"| WikiText-2 ppl ({windows} x 2048) | torch | ONNX (as exported) | difference |", "|---|---|---|---|"]
    for k, v in result["perplexity"].items():
        md.append(f"| {k} | {v['torch']:.4f} | {v['onnx']:.4f} | {100 * v['rel_diff']:+.3f}% |")
    (out_dir / f"{stem}.md").write_text("\n".join(md) + "\n")
    log("\n".join(md))


def main() -> int:
    args = parse_args()
    for f in (CALIB, WIKI):
        if not f.is_file():
            print(f"skipped: {f} is missing (set SPARSEGPT_DATA to the shared data folder)")
            return 0
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    graph_kind = "traced" if args.ort_fusions else args.onnx_graph
    stem = "onnx_cpu_fused" if args.ort_fusions else {"gqa": "onnx_cpu", "traced": "onnx_cpu_traced"}[graph_kind]
    log = Log(out_dir / f"{stem}.log")
    alpha = args.smooth_alpha
    work = Path(args.work) if args.work else (
        Path.home() / ".cache" / "sparsegpt-export" / ("bench-onnx" + ("" if alpha is None else f"-smooth{alpha:g}")))
    work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    import onnxruntime as ort
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log(f"# onnx_cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, threads {args.threads}; "
        f"torch {torch.__version__}, onnxruntime {ort.__version__}, transformers {transformers.__version__}")
    log(f"load at the start: {uptime()}")
    result: dict = {"threads": args.threads, "repeats": args.repeats, "prefill_tokens": args.prefill,
                    "decode_tokens": args.decode, "smooth_alpha": alpha, "smooth_lm_head_alpha": args.smooth_lm_head_alpha,
                    "onnx_graph": graph_kind, "ort_fusions": "cpu" if args.ort_fusions else None,
                    "versions": {"torch": torch.__version__, "onnxruntime": ort.__version__,
                                 "transformers": transformers.__version__}}
    src, fresh = compress_outputs(args, work, log)
    work_graph = export_graphs(args, src, fresh, work, log, result)
    result["sizes"] = sizes(work_graph, log)

    tok = AutoTokenizer.from_pretrained(str(src["plain"]))
    text = WIKI.read_text()
    ids = tok(text[:20000].replace("\r\n", "\n"), return_tensors="np").input_ids[:, : args.prefill].astype(np.int64)
    short = tok(SHORT_PROMPT, return_tensors="np").input_ids.astype(np.int64)
    result["short_prompt"], result["short_prompt_tokens"] = SHORT_PROMPT, int(short.shape[1])
    torch_models = {k: AutoModelForCausalLM.from_pretrained(str(v), dtype=torch.float32).eval() for k, v in src.items()}
    result["parity"] = parity(torch_models, work_graph, ids, args.threads, log)
    result["perplexity"] = {} if args.skip_ppl else perplexities(torch_models, work_graph, tok, text, args, log)

    prompts = {"short": short, "long": ids}
    plan = {name: (ort_model(d, args.threads), prompts) for name, d in work_graph.items()}
    for name in ("onnx-int4", "onnx-int4-lmhead4"):  # level 4's speed beside a default that is not 4
        if result["accuracy_levels"][name] != 4:
            plan[f"{name}@level4"] = (ort_model(work_graph[name], args.threads, 4), {"short": short})
    if args.torch_speed:  # the torch model itself, short prompt only (slow)
        plan["torch-eager"] = (torch_models["plain"], {"short": short})
    raw = speed(plan, args.decode, args.repeats, log)
    result["speed_raw"] = raw
    result["speed"] = summarize(raw, args.decode)
    write_report(result, args, out_dir, stem, log)
    log(f"load at the end: {uptime()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
