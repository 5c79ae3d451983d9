"""Benchmark: SmolLM2-135M 2:4 + 4-bit as ONNX graphs in ONNX Runtime on CPU, against the float32 graph and torch.

    python benchmarks/onnx_cpu.py [--threads 2] [--repeats 5] [--smooth-alpha 0.6] [--onnx-graph gqa|traced]
                                  [--work DIR] [--out DIR]

1. compress (unless ``--work`` already holds the outputs): SmolLM2-135M-Instruct to 2:4 + 4-bit g128 symmetric on
   the fixed calibration tokens (``calib-smollm2-c4-128x512.safetensors``, 128 x 512) with ``--smooth-alpha 0.6``
   (activation smoothing, for the int8 activations of accuracy_level 4; ``--smooth-alpha 0`` for none), once as is
   and once with ``--quantize-lm-head`` (its final norm -> lm_head pair at ``--smooth-lm-head-alpha 0.3``);
2. export three graphs with the CLI (``--onnx-graph gqa`` unless told otherwise): ``--onnx-quant none`` (float32,
   the baseline), ``matmulnbits`` (float lm_head) and ``matmulnbits`` of the ``--quantize-lm-head`` output, both
   at the default ``accuracy_level`` 4;
3. sizes: the initializers of the compressed layers against their float32 bytes;
4. parity against the torch compressed model (float32): logits of a 512-token WikiText-2 window with the
   MatMulNBits nodes set to accuracy_level 0, 1 and 4; greedy generation of 32 tokens; perplexity on WikiText-2
   (16 windows x 2048) of torch and of the shipped graphs (level 4);
5. speed, all variants side by side in one process, interleaved per repeat, ONNX Runtime and torch on
   ``--threads`` threads: prefill latency of 512 tokens and decode tokens/s of 128 new tokens after that prompt
   (greedy, KV cache), median and spread (min, max) over ``--repeats`` runs after one warm-up. The ONNX graphs
   run through `OnnxCausalLM` (for the gqa graph with the KV buffers shared in place), torch through the model.

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

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("SPARSEGPT_DATA", ROOT.parent / "shared" / "data"))
CALIB = DATA / "calib-smollm2-c4-128x512.safetensors"
WIKI = DATA / "wikitext2-raw-test.txt"
HEAD_ALPHA = 0.3  # --smooth-lm-head-alpha of the --quantize-lm-head model (onnx_smoothing_lmhead.md)
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
    """Prefill, then greedy decode one token per forward with the KV cache: torch or `OnnxCausalLM` alike."""

    def __init__(self, model):
        self.m = model

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
        return tokens


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--decode", type=int, default=128)
    ap.add_argument("--ppl-windows", type=int, default=16)
    ap.add_argument("--smooth-alpha", type=float, default=0.6,
                    help="compress with --smooth-alpha (default 0.6; 0: none), see benchmarks/onnx_smoothing.py")
    ap.add_argument("--smooth-lm-head-alpha", type=float, default=HEAD_ALPHA,
                    help=f"the --quantize-lm-head model's --smooth-lm-head-alpha (default {HEAD_ALPHA}), see "
                         "benchmarks/onnx_smoothing.py --lm-head-alphas")
    ap.add_argument("--work", default=None,
                    help="work folder (default ~/.cache/sparsegpt-export/bench-onnx, -smooth<alpha> when smoothing)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--ort-fusions", action="store_true",
                    help="export the graphs with --ort-fusions cpu (into <work>/<graph>-fused; results onnx_cpu_fused.*)")
    ap.add_argument("--onnx-graph", choices=["gqa", "traced"], default="gqa",
                    help="which graph to export (default gqa; traced: into <work>/<graph>-traced, results onnx_cpu_traced.*)")
    ap.add_argument("--skip-ppl", action="store_true", help="leave out the perplexity section")
    ap.add_argument("--reuse-exports", action="store_true",
                    help="keep the graphs already in --work (made by this script's export commands) instead of re-exporting")
    args = ap.parse_args()
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
        Path.home() / ".cache" / "sparsegpt-export" / ("bench-onnx" + (f"-smooth{alpha:g}" if alpha else "")))
    work.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    torch.set_num_threads(args.threads)
    import onnxruntime as ort
    import transformers

    log(f"# onnx_cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, threads {args.threads}; "
        f"torch {torch.__version__}, onnxruntime {ort.__version__}, transformers {transformers.__version__}")
    result: dict = {"threads": args.threads, "repeats": args.repeats, "prefill_tokens": args.prefill,
                    "decode_tokens": args.decode, "versions": {"torch": torch.__version__, "onnxruntime": ort.__version__,
                                                               "transformers": transformers.__version__}}

    # 1-2. compress and export ------------------------------------------------------------------------------
    src = {"plain": work / "c-plain", "lmhead": work / "c-lmhead"}
    smooth = ["--smooth-alpha", str(alpha)] if alpha else []
    result["smooth_alpha"] = alpha
    head = args.smooth_lm_head_alpha
    result["smooth_lm_head_alpha"] = head
    fresh = set()  # compress outputs made in this run: their graphs are exported again whatever --reuse-exports says
    for key, extra, want in (("plain", [], {}), ("lmhead", ["--quantize-lm-head", "--smooth-lm-head-alpha", str(head)],
                                                 {"smooth_lm_head_alpha": head})):
        cfg = src[key] / "sparsegpt_config.json"
        have = json.loads(cfg.read_text()) if cfg.is_file() else None
        if have is None or have.get("smooth_alpha", 0.0) != alpha or any(have.get(k) != v for k, v in want.items()):
            sh([py, "-m", "sparsegpt_export", "compress", "smollm2-135m", *COMPRESS, *smooth, *extra, "--out", str(src[key]),
                "--overwrite", "--no-progress"], log)
            fresh.add(key)
        else:
            log(f"reusing {src[key]}")
    graphs = {"onnx-float32": (src["plain"], "none"), "onnx-int4": (src["plain"], "matmulnbits"),
              "onnx-int4-lmhead4": (src["lmhead"], "matmulnbits")}
    fused = ["--ort-fusions", "cpu"] if args.ort_fusions else []
    suffix = "-fused" if args.ort_fusions else {"gqa": "", "traced": "-traced"}[graph_kind]
    result["ort_fusions"] = "cpu" if args.ort_fusions else None
    result["onnx_graph"] = graph_kind
    result["export_s"] = {}
    for name, (s, q) in graphs.items():
        if args.reuse_exports and s not in {src[k] for k in fresh} \
                and (work / (name + suffix) / "sparsegpt_onnx.json").is_file():
            log(f"reusing {work / (name + suffix)}")
            continue
        result["export_s"][name] = round(sh([py, "-m", "sparsegpt_export", "export", str(s), "--format", "onnx",
                                             "--onnx-quant", q, "--onnx-graph", graph_kind, *fused, "--out", str(work / (name + suffix)),
                                             "--overwrite"], log), 1)
    work_graph = {name: work / (name + suffix) for name in graphs}

    # 3. sizes --------------------------------------------------------------------------------------------------
    result["sizes"] = {}
    for name in graphs:
        files = {f.name: f.stat().st_size for f in work_graph[name].iterdir() if f.name.startswith("model.onnx")}
        entry = {"files": files}
        if name != "onnx-float32":
            entry["compressed_layers"] = compressed_bytes(work_graph[name] / "model.onnx")
        result["sizes"][name] = entry
        log(f"{name}: files {files} {entry.get('compressed_layers', '')}")

    # 4. parity ---------------------------------------------------------------------------------------------------
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sparsegpt_export.evaluation import perplexity
    from sparsegpt_export.onnx import OnnxCausalLM

    tok = AutoTokenizer.from_pretrained(str(src["plain"]))
    text = WIKI.read_text()
    ids = tok(text[:20000].replace("\r\n", "\n"), return_tensors="np").input_ids[:, : args.prefill].astype(np.int64)
    torch_models = {k: AutoModelForCausalLM.from_pretrained(str(v), dtype=torch.float32).eval() for k, v in src.items()}
    result["parity"] = {}
    prompt = ids[:, :64]
    for name, key in (("onnx-int4", "plain"), ("onnx-int4-lmhead4", "lmhead")):
        tl = Loop(torch_models[key])
        want = tl.prefill(ids).logits[0].numpy()
        want_gen = tl.decode(tl.prefill(prompt), 32, prompt.shape[1])
        for level in (0, 1, 4):
            loop = Loop(ort_model(work_graph[name], args.threads, level))
            got = loop.prefill(ids).logits[0].numpy()
            rel = float(np.linalg.norm(got - want) / np.linalg.norm(want))  # ||diff|| / ||torch||, all logits
            rel_max = float(np.abs(got - want).max() / np.abs(want).max())  # the worst logit, for the record
            gen = loop.decode(loop.prefill(prompt), 32, prompt.shape[1])
            first_diff = next((i for i, (a, b) in enumerate(zip(want_gen, gen)) if a != b), None)
            result["parity"][f"{name}@level{level}"] = {"logits_rel_err": rel, "logits_maxabs_rel_err": rel_max,
                                                        "greedy32_identical": gen == want_gen,
                                                        "first_differing_token": first_diff}
            log(f"parity {name} accuracy_level {level}: logits rel err {rel:.3g} (max-abs {rel_max:.3g}), "
                f"greedy 32 identical {gen == want_gen} (first difference at {first_diff})")

    result["perplexity"] = {}
    for key, name in (("plain", "onnx-int4"), ("lmhead", "onnx-int4-lmhead4")):
        if args.skip_ppl:
            break
        t0 = time.perf_counter()
        pt = perplexity(torch_models[key], tok, text, seqlen=2048, windows=args.ppl_windows, device="cpu")
        t1 = time.perf_counter()
        om = OnnxCausalLM.from_pretrained(work_graph[name], num_threads=args.threads)
        po = perplexity(om, tok, text, seqlen=2048, windows=args.ppl_windows, device="cpu")
        t2 = time.perf_counter()
        del om
        result["perplexity"][key] = {"torch": pt["ppl"], "onnx": po["ppl"], "rel_diff": po["ppl"] / pt["ppl"] - 1,
                                     "windows": pt["windows"], "seqlen": 2048, "torch_s": round(t1 - t0, 1),
                                     "onnx_s": round(t2 - t1, 1)}
        log(f"perplexity wikitext2 {key}: torch {pt['ppl']:.4f}, {name} {po['ppl']:.4f} "
            f"({100 * (po['ppl'] / pt['ppl'] - 1):+.3f}%)")

    # 5. speed ----------------------------------------------------------------------------------------------------
    loops = {name: Loop(ort_model(work_graph[name], args.threads)) for name in graphs}
    loops["torch-eager"] = Loop(torch_models["plain"])
    timings = {name: {"prefill_ms": [], "decode_tok_s": []} for name in loops}
    for rep in range(args.repeats + 1):
        line = []
        for name, loop in loops.items():
            t0 = time.perf_counter()
            out = loop.prefill(ids)
            t1 = time.perf_counter()
            loop.decode(out, args.decode, ids.shape[1])
            t2 = time.perf_counter()
            line.append(f"{name} prefill {1000 * (t1 - t0):.1f} ms decode {args.decode / (t2 - t1):.1f} tok/s")
            if rep:  # the first round is the warm-up
                timings[name]["prefill_ms"].append(1000 * (t1 - t0))
                timings[name]["decode_tok_s"].append(args.decode / (t2 - t1))
        log(f"repeat {rep}{' (warm-up)' if rep == 0 else ''}: " + "; ".join(line))
    result["speed"] = {name: {k: stats(v) for k, v in t.items()} for name, t in timings.items()}
    base = result["speed"]["onnx-float32"]
    result["ratios"] = {
        name: {"decode_vs_onnx_float32": result["speed"][name]["decode_tok_s"]["median"] / base["decode_tok_s"]["median"],
               "prefill_speedup_vs_onnx_float32": base["prefill_ms"]["median"] / result["speed"][name]["prefill_ms"]["median"]}
        for name in loops
    }

    # report -------------------------------------------------------------------------------------------------------
    (out_dir / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    md = [f"SmolLM2-135M-Instruct 2:4 + int4 g128 sym" + (f" (--smooth-alpha {alpha:g}; the lm_head model --smooth-lm-head-alpha {head:g})" if alpha else "")
          + f", ONNX Runtime {ort.__version__} CPU, {args.threads} threads"
          f", {graph_kind} graph{' exported with --ort-fusions cpu' if args.ort_fusions else ''}; "
          f"median (min-max) of {args.repeats} runs; prefill {args.prefill} tokens, decode {args.decode} new tokens.", "",
          "| variant | prefill ms | decode tok/s | decode vs float32 ONNX | prefill speedup |", "|---|---|---|---|---|"]
    for name, sp in result["speed"].items():
        p, d, r = sp["prefill_ms"], sp["decode_tok_s"], result["ratios"][name]
        md.append(f"| {name} | {p['median']:.1f} ({p['min']:.1f}-{p['max']:.1f}) | {d['median']:.1f} "
                  f"({d['min']:.1f}-{d['max']:.1f}) | {r['decode_vs_onnx_float32']:.2f}x | "
                  f"{r['prefill_speedup_vs_onnx_float32']:.2f}x |")
    md += ["", "| graph | compressed-layer initializers | their float32 bytes | ratio |", "|---|---|---|---|"]
    for name, s in result["sizes"].items():
        c = s.get("compressed_layers")
        if c:
            md.append(f"| {name} | {c['initializer_bytes']:,} ({c['matmulnbits_nodes']} MatMulNBits) | {c['float32_bytes']:,} | {c['ratio']:.4f} |")
    md += ["", "| parity vs torch | logits rel err ‖Δ‖/‖torch‖ (512 tokens) | worst logit: max\\|Δ\\|/max\\|torch\\| | "
               "greedy 32 tokens identical |", "|---|---|---|---|"]
    for k, v in result["parity"].items():
        md.append(f"| {k} | {v['logits_rel_err']:.3g} | {v['logits_maxabs_rel_err']:.3g} | {v['greedy32_identical']} |")
    md += ["", "| WikiText-2 ppl (16 x 2048) | torch | ONNX (accuracy_level 4) | difference |", "|---|---|---|---|"]
    for k, v in result["perplexity"].items():
        md.append(f"| {k} | {v['torch']:.4f} | {v['onnx']:.4f} | {100 * v['rel_diff']:+.3f}% |")
    (out_dir / f"{stem}.md").write_text("\n".join(md) + "\n")
    log("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
