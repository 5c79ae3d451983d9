"""The suites of ``python -m benchmarks run``: gemm, e2e, compress, and the ceilings printed beside them."""
from __future__ import annotations

import gc
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from . import serving
from .harness import environment, rel_error, timed, ratio

NO_CUDA = "needs a CUDA GPU with 2:4 sparse tensor cores (Ampere or newer)"

# linear shapes (out, in) of W; x is [M, in]
SHAPES = {
    "8B q_proj/o_proj": (4096, 4096), "8B k_proj/v_proj": (1024, 4096), "8B gate/up_proj": (14336, 4096),
    "8B down_proj": (4096, 14336), "70B q_proj/o_proj": (8192, 8192), "70B gate/up_proj": (28672, 8192),
    "70B down_proj": (8192, 28672),
}
TOKENS = [1, 16, 64, 256, 1024, 4096, 16384]


def prune_24(w: torch.Tensor) -> torch.Tensor:
    """Keep the 2 largest |w| of every 4 along the input dimension (kernel speed does not depend on values)."""
    rows, cols = w.shape
    g = w.reshape(rows, cols // 4, 4)
    idx = g.abs().topk(2, dim=-1).indices
    return torch.zeros_like(g).scatter_(-1, idx, g.gather(-1, idx)).reshape(rows, cols)


# ---------------------------------------------------------------------------------------------- ceilings
def ceilings(group_size: int = 128) -> dict[str, Any]:
    """Bytes per weight of each format and the decode (weight-memory-bound) ceiling against fp16 dense."""
    scale = 2 / group_size  # one float16 scale per group
    fmts = {
        "fp16 dense": 2.0,
        "fp16 2:4 (values + 2-bit metadata per kept value)": 0.5 * 2 + 0.5 * 2 / 8,
        f"int4 dense + fp16 scales per {group_size}": 0.5 + scale,
        f"int4 2:4 (code + 2-bit position per kept value) + fp16 scales per {group_size}": 0.5 * (4 + 2) / 8 + scale,
    }
    return {"math_2of4": 2.0,
            "formats": [{"format": k, "bytes_per_weight": round(v, 4), "decode_ceiling_vs_fp16": round(2.0 / v, 3)}
                        for k, v in fmts.items()]}


def ceilings_table() -> list[str]:
    c = ceilings()
    lines = [f"Ceilings: 2:4 math at most {c['math_2of4']:.1f}x dense; weight-memory-bound decode:", "",
             "| format | bytes/weight | decode ceiling vs fp16 dense |", "|---|---|---|"]
    lines += [f"| {r['format']} | {r['bytes_per_weight']} | {r['decode_ceiling_vs_fp16']}x |" for r in c["formats"]]
    return lines


# ---------------------------------------------------------------------------------------------- gemm
def run_gemm(device: str, quick: bool) -> dict[str, Any]:
    cuda = device.startswith("cuda")
    shapes = dict(SHAPES)
    tokens = list(TOKENS)
    dtypes = [torch.float16, torch.bfloat16] if cuda else [torch.float32]
    if quick:
        shapes = {"8B k_proj/v_proj": SHAPES["8B k_proj/v_proj"]} if not cuda else {k: SHAPES[k] for k in ("8B gate/up_proj", "8B down_proj")}
        tokens = [1, 16, 64] if not cuda else [16, 4096]
    elif not cuda:  # dense float32 on a CPU: the large M take minutes each and there is nothing to compare
        shapes = {k: v for k, v in SHAPES.items() if k.startswith("8B")}
        tokens = [1, 16, 64]
    rows = []
    bw = serving.copy_bandwidth(device) if cuda else None
    for dtype in dtypes:
        for name, (out_f, in_f) in shapes.items():
            w = prune_24(torch.randn(out_f, in_f, device=device, dtype=dtype) * 0.02)
            w4 = serving.on_int4_grid(w) if cuda and dtype == torch.float16 else None
            for m in tokens:
                x = torch.randn(m, in_f, device=device, dtype=dtype)
                row: dict[str, Any] = {"shape": name, "out": out_f, "in": in_f, "tokens": m, "dtype": str(dtype)[6:]}
                row["dense"] = timed(lambda: F.linear(x, w), device, warmup=3, repeat=5 if not cuda else 20)
                if cuda:
                    row["dense_graph"] = serving.graph_timed(lambda: F.linear(x, w), device)
                    for backend in ("cusparselt", "cutlass"):
                        row[backend] = _sparse_gemm(x, w, backend, device, row["dense"])
                    if w4 is not None:
                        row.update(_our_gemm(x, w4, device, row, bw))
                else:
                    row["sparse"] = {"skipped": NO_CUDA}
                rows.append(row)
                print(_gemm_line(row), flush=True)
            del w, w4
    res = {"suite": "gemm", "env": environment(device), "quick": quick, "rows": rows, "ceilings": ceilings()}
    if bw:
        res["copy_bandwidth_gb_s"] = bw
    return res


OURS = ("int4 2:4", "fp16 2:4", "int4 dense (tinygemm)")


def _our_gemm(x: torch.Tensor, w4: torch.Tensor, device: str, row: dict, bw: float) -> dict[str, Any]:
    """fp16 rows: our kernels and the tinygemm anchor on the same 2:4 weight put on the int4 g128 grid (timing does
    not depend on the values), each eager and CUDA-graph replay, x dense against the dense row's same mode."""
    out, cache, ref = {}, {}, F.linear(x, w4)
    for variant in OURS:
        try:
            layer, info = serving.make_layer(variant, w4, cache, None)
            cell = serving._cell(layer, x, ref, device, info, bw)
        except Exception as e:  # noqa: BLE001 - a failing variant is a result
            cell = {"skipped": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"}
        if "eager" in cell:
            cell["x_dense_eager"] = row["dense"]["median_ms"] / cell["eager"]["median_ms"]
            cell["x_dense_graph"] = row["dense_graph"]["median_ms"] / cell["graph"]["median_ms"]
        out[variant] = cell
    return out


def _sparse_gemm(x: torch.Tensor, w: torch.Tensor, backend: str, device: str, dense: dict) -> dict[str, Any]:
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    if backend == "cusparselt" and not torch.backends.cusparselt.is_available():
        return {"skipped": "cuSPARSELt is not available in this PyTorch build"}
    old = SparseSemiStructuredTensor._FORCE_CUTLASS
    SparseSemiStructuredTensor._FORCE_CUTLASS = backend == "cutlass"
    try:
        ws = to_sparse_semi_structured(w)
        ref = F.linear(x, w)
        err = rel_error(ref, F.linear(x, ws))
        if err > 1e-2:
            return {"skipped": f"result differs from dense (relative error {err:.3g}); not timed"}
        t = timed(lambda: F.linear(x, ws), device, warmup=3, repeat=20)
        t.update(rel_error=err, speedup=ratio(dense, t))
        return t
    except (RuntimeError, ValueError) as e:
        return {"skipped": f"{backend}: {str(e).splitlines()[0][:200]}"}
    finally:
        SparseSemiStructuredTensor._FORCE_CUTLASS = old


def _gemm_line(r: dict) -> str:
    parts = [f"{r['dtype']:8s} {r['shape']:20s} M={r['tokens']:<6d} dense {r['dense']['median_ms']:.4f} ms"]
    for k in ("cusparselt", "cutlass", "sparse"):
        if k in r:
            v = r[k]
            parts.append(f"{k} " + (f"{v['median_ms']:.4f} ms ({v['speedup']:.2f}x)" if "speedup" in v else "skipped"))
    return "  ".join(parts)


def gemm_table(res: dict) -> list[str]:
    cuda = res["env"]["device"].startswith("cuda")
    head = "| dtype | shape | M | dense ms | " + ("cuSPARSELt ms | x dense | CUTLASS ms | x dense |" if cuda else "2:4 sparse |")
    lines = [f"gemm on {res['env']['device_name']} (median of repeats; speedup = dense median / sparse median)", "",
             head, "|" + "---|" * (head.count("|") - 1)]
    for r in res["rows"]:
        cells = [r["dtype"], r["shape"], str(r["tokens"]), f"{r['dense']['median_ms']:.4f}"]
        for k in (("cusparselt", "cutlass") if cuda else ("sparse",)):
            v = r[k]
            cells += [f"{v['median_ms']:.4f}", f"{v['speedup']:.2f}"] if "speedup" in v else (
                ["skipped: " + v["skipped"]] + ([""] if cuda else []))
        lines.append("| " + " | ".join(cells) + " |")
    ours = [r for r in res["rows"] if "int4 2:4" in r]
    return lines + (_our_gemm_table(ours, res.get("copy_bandwidth_gb_s")) if ours else [])


def _our_gemm_table(rows: list[dict], bw: float) -> list[str]:
    lines = ["", f"Our kernels and the int4 dense anchor (float16 rows; ms eager / CUDA-graph replay; x = dense ms / "
             f"ms in the same mode; GB/s = weight bytes / graph time, copy bandwidth {bw:.0f} GB/s)", "",
             "| shape | M | dense eager / graph | " + " | ".join(f"{v} eager / graph | x dense (graph)" for v in OURS)
             + " | int4 2:4 GB/s (% copy) |", "|---|---|---|" + "---|---|" * len(OURS) + "---|"]
    for r in rows:
        cells = [r["shape"], str(r["tokens"]), f"{r['dense']['median_ms']:.4f} / {r['dense_graph']['median_ms']:.4f}"]
        for v in OURS:
            c = r[v]
            cells += ([f"{c['eager']['median_ms']:.4f} / {c['graph']['median_ms']:.4f}", f"{c['x_dense_graph']:.2f}"]
                      if "graph" in c else [f"skipped: {c.get('skipped', '-')[:100]}", ""])
        c = r["int4 2:4"]
        cells.append(f"{c['graph_gb_s']:.0f} ({100 * c['graph_fraction_of_copy_bw']:.0f}%)" if "graph_gb_s" in c else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def gemm_plot(res: dict):
    def plot(path: Path) -> None:
        import matplotlib.pyplot as plt

        rows = [r for r in res["rows"] if any("speedup" in r.get(k, {}) for k in ("cusparselt", "cutlass"))]
        if not rows:
            return
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
        for ax, dtype in zip(axes, ("float16", "bfloat16")):
            for shape in dict.fromkeys(r["shape"] for r in rows):
                for k, style in (("cusparselt", "-o"), ("cutlass", "--x")):
                    pts = [(r["tokens"], r[k]["speedup"]) for r in rows
                           if r["shape"] == shape and r["dtype"] == dtype and "speedup" in r[k]]
                    if pts:
                        ax.plot(*zip(*pts), style, label=f"{shape} {k}")
            ax.axhline(1.0, color="gray", lw=0.8)
            ax.set_xscale("log", base=2)
            ax.set_title(f"2:4 vs dense, {dtype}")
            ax.set_xlabel("tokens M")
        axes[0].set_ylabel("speedup (x dense)")
        axes[1].legend(fontsize=6, ncol=2)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    return plot


# ---------------------------------------------------------------------------------------------- e2e
E2E_MODELS = {  # Llama architecture, random weights
    "llama-1B": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "llama-8B": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1024, tie_word_embeddings=True),
}


def _random_pruned_export(cfg_kwargs: dict, work: Path, dtype: torch.dtype) -> tuple[Path, Path, int]:
    """A random Llama with every decoder linear pruned 2:4, saved as a compress output and exported as sparse24."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from sparsegpt_export.config import SparseGPTConfig
    from sparsegpt_export.converters import sparse24
    from sparsegpt_export.anatomy import block_linears, find_blocks
    from sparsegpt_export.records import CompressionResult, LayerRecord
    from sparsegpt_export.io import save_compressed

    torch.manual_seed(0)
    cfg = LlamaConfig(**cfg_kwargs, max_position_embeddings=4096)
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()  # built in dtype: no float32 copy
    records = {}
    path, blocks = find_blocks(model)
    with torch.no_grad():
        for i, b in enumerate(blocks):
            for name, lin in block_linears(b).items():
                full = f"{path}.{i}.{name}"
                lin.weight.copy_(prune_24(lin.weight))
                records[full] = LayerRecord(full, tuple(lin.weight.shape), "2:4", 0.5, None, None, True)
    params = sum(p.numel() for p in model.parameters())
    comp = save_compressed(model, None, CompressionResult(records, {}, SparseGPTConfig(pattern="2:4", bits=None)),
                           work / "compressed")
    del model
    gc.collect()
    return comp, sparse24.export(comp, work / "sparse24", dtype=dtype), params


def run_e2e(device: str, quick: bool) -> dict[str, Any]:
    import sparsegpt_export  # noqa: F401  (registers the sparse24 loader)
    from transformers import AutoModelForCausalLM

    cuda = device.startswith("cuda")
    if cuda and not quick:  # built on the GPU in fp16; dense, tinygemm, fp16 2:4, int4 2:4; eager and compiled
        plan = {"prefill": [(1, 2048), (8, 512)], "decode": [1, 16, 64], "new_tokens": 128, "repeat": 3}
        rows = serving.e2e_rows(device, {k: E2E_MODELS[k] for k in ("llama-1B", "llama-8B")}, plan, float("inf"))
        return {"suite": "e2e", "env": environment(device), "quick": quick, "serving": True, "rows": rows,
                "ceilings": ceilings()}
    dtype = torch.float16 if cuda else torch.float32
    names = ["llama-1B"] if cuda else ["tiny"]
    prefill = [(1, 2048), (8, 512)] if not quick else [(1, 128), (2, 64)]
    decode = [1, 16, 64] if not quick else [1, 4]
    new_tokens = 128 if not quick else 16
    rows = []
    for mname in names:
        with tempfile.TemporaryDirectory(prefix=f"e2e-{mname}-") as tmp:
            comp, s24, params = _random_pruned_export(E2E_MODELS[mname], Path(tmp), dtype)
            res: dict[str, Any] = {"model": mname, "parameters": params, "dtype": str(dtype)[6:],
                                   "note": "random weights pruned 2:4: kernel speed does not depend on the values"}
            for variant, folder in (("dense", comp), ("sparse24", s24)):
                if cuda:
                    torch.cuda.empty_cache()
                    base = torch.cuda.memory_allocated()
                model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype,
                                                             device_map=device if cuda else None).eval()
                r: dict[str, Any] = {}
                if cuda:
                    r["weights_gib_on_device"] = (torch.cuda.memory_allocated() - base) / 2**30
                if variant == "sparse24":
                    rep = model.sparsegpt_load_report
                    r["layers_on_kernels"], r["layers_dense"] = rep["kernels"], rep["dense"]
                vocab = model.config.vocab_size
                with torch.no_grad():
                    for bsz, seq in prefill:
                        ids = torch.randint(0, vocab, (bsz, seq), device=device)
                        r[f"prefill_{bsz}x{seq}"] = timed(lambda: model(ids, use_cache=True), device,
                                                         warmup=2, repeat=5 if not quick else 3)
                    for bsz in decode:
                        ids = torch.randint(0, vocab, (bsz, 16), device=device)
                        kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                  pad_token_id=0)
                        t = timed(lambda: model.generate(ids, **kw), device, warmup=1, repeat=3 if not quick else 2)
                        t["tokens_per_s"] = bsz * new_tokens / (t["median_ms"] / 1e3)
                        r[f"decode_b{bsz}"] = t
                res[variant] = r
                del model
                gc.collect()
            res["speedup"] = {k: ratio(res["dense"][k], res["sparse24"][k])
                              for k in res["dense"] if k.startswith(("prefill", "decode"))}
            if not cuda:
                res["speedup_note"] = "CPU: sparse24 layers are decoded to dense at load, so about 1x is expected"
            rows.append(res)
            print({k: round(v, 3) for k, v in res["speedup"].items()}, flush=True)
    return {"suite": "e2e", "env": environment(device), "quick": quick, "rows": rows, "ceilings": ceilings()}


def e2e_table(res: dict) -> list[str]:
    if res.get("serving"):
        from .gpu_check import e2e_table as serving_table

        return serving_table({"env": res["env"], "e2e": res["rows"]})
    lines = [f"e2e on {res['env']['device_name']}: sparse24-loaded vs dense, same model "
             "(random weights pruned 2:4; kernel speed does not depend on the values)", "",
             "| model | measure | dense | sparse24 | x dense |", "|---|---|---|---|---|"]
    for r in res["rows"]:
        for k, sp in r["speedup"].items():
            d, s = r["dense"][k], r["sparse24"][k]
            unit = (lambda t: f"{t['tokens_per_s']:.1f} tok/s") if k.startswith("decode") else (
                lambda t: f"{t['median_ms']:.2f} ms")
            lines.append(f"| {r['model']} | {k} | {unit(d)} | {unit(s)} | {sp:.2f} |")
        if "weights_gib_on_device" in r["dense"]:
            lines.append(f"| {r['model']} | weights on device | {r['dense']['weights_gib_on_device']:.2f} GiB | "
                         f"{r['sparse24']['weights_gib_on_device']:.2f} GiB | |")
    return lines


# ---------------------------------------------------------------------------------------------- compress
PEER_VENV = Path.home() / ".cache" / "sparsegpt-export" / "llmcompressor-venv"
PEER_SCRIPT = Path(__file__).with_name("peer_llmcompressor.py")
PEER_HOWTO = ("pass --peer-python PYTHON (a Python with llmcompressor), set SPARSEGPT_PEER_PYTHON, or --install-peer "
              f"(creates {PEER_VENV} with torch and llmcompressor)")
_OURS = ("import json, resource, sys, time, torch\n"
         "from sparsegpt_export.cli import main\n"
         "cuda = '--device' in sys.argv and sys.argv[sys.argv.index('--device') + 1].startswith('cuda')\n"
         "t0 = time.perf_counter(); rc = main(sys.argv[1:]); wall = time.perf_counter() - t0\n"
         "r = {'rc': rc, 'wall_s': round(wall, 2),\n"
         "     'peak_rss_mb': round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}\n"
         "if cuda: r['peak_gpu_mb'] = round(torch.cuda.max_memory_allocated() / 2**20, 1)\n"
         "print('OURS_RESULT ' + json.dumps(r)); sys.exit(rc)\n")


def install_peer(venv: Path = PEER_VENV) -> Path:
    """llmcompressor in its own virtual environment (it pins its own transformers and compressed-tensors), with the
    torch this process runs; returns its Python."""
    import subprocess
    import venv as venv_mod

    py = venv / "bin" / "python"
    if not py.exists():
        venv_mod.create(venv, with_pip=True)
    base = torch.__version__.split("+")[0]
    for pkgs in ([f"torch=={base}"], ["llmcompressor"]):
        subprocess.run([str(py), "-m", "pip", "install", "-q", *pkgs], check=True)
    return py


def find_peer(peer_python: str | None, quick: bool) -> str | None:
    """The Python that runs llmcompressor: --peer-python, else $SPARSEGPT_PEER_PYTHON, else (full runs only) the
    default virtual environment when it exists."""
    import os

    p = peer_python or os.environ.get("SPARSEGPT_PEER_PYTHON")
    if p:
        return p
    if not quick and (PEER_VENV / "bin" / "python").exists():
        return str(PEER_VENV / "bin" / "python")
    return None


def _word_tokenizer(vocab_size: int):
    """A stand-in tokenizer for a random model (one word per token id); the calibration tokens are given as ids."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    t.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=t, unk_token="t0", pad_token="t0", eos_token="t1")


def _nm_violation(folder: Path, n: int = 2, m: int = 4) -> dict[str, float]:
    """Over the decoder blocks' linear weights saved in ``folder``: the fraction of groups of ``m`` consecutive
    weights along the input dimension with more than ``n`` nonzeros, and the fraction of zeros."""
    from safetensors import safe_open

    groups = bad = zeros = total = 0
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as sf:
            for k in sf.keys():
                if not (".layers." in k or ".h." in k) or not k.endswith("proj.weight"):
                    continue
                w = sf.get_tensor(k)
                if w.dim() != 2 or w.shape[1] % m:
                    continue
                nz = (w != 0).reshape(w.shape[0], -1, m).sum(-1)
                groups += nz.numel()
                bad += int((nz > n).sum())
                zeros += int((w == 0).sum())
                total += w.numel()
    if not groups:
        return {"skipped": f"no decoder linear weights found in {folder}"}
    head = head_total = 0  # the output projection (or the tied embedding): neither tool should prune it
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as sf:
            for k in sf.keys():
                if k.endswith(("lm_head.weight", "embed_tokens.weight", "wte.weight", "embed_in.weight")):
                    w = sf.get_tensor(k)
                    head += int((w == 0).sum())
                    head_total += w.numel()
    out = {"nm_violating_groups": bad / groups, "zero_fraction": zeros / total}
    if head_total:
        out["head_zero_fraction"] = head / head_total
    return out


def _perplexity(folder: Path, eval_ids: torch.Tensor | None, text: str | None, windows: int, seqlen: int,
                device: str) -> dict[str, Any]:
    """Perplexity of the checkpoint in ``folder`` (float32) on ``text`` (its tokenizer) or on ``eval_ids``."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).to(device).eval()
    try:
        if text is not None:
            from transformers import AutoTokenizer

            from sparsegpt_export.evaluation import perplexity

            return {"ppl": perplexity(model, AutoTokenizer.from_pretrained(str(folder)), text, seqlen=seqlen,
                                      windows=windows)["ppl"]}
        nll = []
        with torch.no_grad():
            for row in eval_ids:
                x = row.unsqueeze(0).to(device)
                logits = model(input_ids=x, use_cache=False).logits.float()
                nll.append(F.cross_entropy(logits[0, :-1], x[0, 1:]))
        return {"ppl": float(torch.stack(nll).mean().exp())}
    finally:
        del model
        gc.collect()


def _subprocess(cmd: list[str], log_path: Path, env: dict | None = None) -> tuple[int, float, float, str]:
    """Runs ``cmd`` with its output to ``log_path``; (exit code, wall s, the child's peak RSS MB, output tail)."""
    import os
    import subprocess

    t0 = time.perf_counter()
    with open(log_path, "w") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env)
        _, status, ru = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    out = log_path.read_text(errors="replace")
    return os.waitstatus_to_exitcode(status), wall, ru.ru_maxrss / 1024, out


def run_compress(device: str, quick: bool, peer_python: str | None = None, install: bool = False) -> dict[str, Any]:
    """The whole compression pass, each run its own process (wall time includes loading and writing; peak memory is
    that process's): ours, and llmcompressor's beside it on the same model and the same calibration tokens
    (``benchmarks/peer_llmcompressor.py`` under the peer's Python), then the perplexity and the 2:4 mask of every
    output, measured by the same code. Models: a tiny random Llama with ``--quick``; a ~1B random Llama in float16
    on CUDA; SmolLM2-135M-Instruct on the CPU (calibrated on the fixed C4 tokens of ../shared/data when present,
    random tokens otherwise, evaluated on WikiText-2 when present)."""
    import json
    import os

    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from sparsegpt_export.calibration import load_eval_text

    cuda = device.startswith("cuda")
    work = Path(tempfile.mkdtemp(prefix="bench-compress-"))
    gen = torch.Generator().manual_seed(0)
    text = None
    windows, eval_seqlen = 16, 2048
    if quick or cuda:
        cfg = E2E_MODELS["tiny" if quick else "llama-1B"]
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**cfg))
        model_dir = work / "model"
        model.to(torch.float32 if quick else torch.float16).save_pretrained(model_dir)
        del model
        _word_tokenizer(cfg["vocab_size"]).save_pretrained(model_dir)  # llmcompressor wants one with its data
        source = "tiny random Llama" if quick else "random Llama ~1B (float16)"
        nsamples, seqlen = (8, 64) if quick else (128, 2048)
        calib = work / "calib.safetensors"
        save_file({"input_ids": torch.randint(0, cfg["vocab_size"], (nsamples, seqlen), generator=gen)}, str(calib))
        calib_desc = f"{nsamples} x {seqlen} random tokens"
        eval_ids = torch.randint(0, cfg["vocab_size"], (2, 64) if quick else (4, 2048), generator=gen)
        eval_desc = f"{eval_ids.shape[0]} x {eval_ids.shape[1]} random tokens (random weights: checks the harness only)"
    else:
        from sparsegpt_export.models import resolve_model

        model_dir, source, nsamples, seqlen = Path(resolve_model("smollm2-135m")), "SmolLM2-135M-Instruct", 128, 512
        data = Path(os.environ.get("SPARSEGPT_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
        calib = data / "calib-smollm2-c4-128x512.safetensors"
        if calib.is_file():
            calib_desc = f"{nsamples} x {seqlen} fixed C4 tokens ({calib.name})"
        else:
            calib = work / "calib.safetensors"
            save_file({"input_ids": torch.randint(0, 49152, (nsamples, seqlen), generator=gen)}, str(calib))
            calib_desc = f"{nsamples} x {seqlen} random tokens"
        wiki = data / "wikitext2-raw-test.txt"
        eval_ids = None
        if wiki.is_file():
            text, eval_desc = load_eval_text(wiki), f"WikiText-2 raw test, {windows} x {eval_seqlen}"
        else:
            eval_desc = "skipped: ../shared/data/wikitext2-raw-test.txt is missing"
    if install and not find_peer(peer_python, quick):
        peer_python = str(install_peer())
    peer = find_peer(peer_python, quick)
    configs = [  # label, our flags, the peer's runs (a label suffix and its flags)
        ("2:4", ["--pattern", "2:4", "--bits", "none"], [("", ["--recipe", "sparsegpt-2:4"])]),
        ("2:4 + w4g128", ["--pattern", "2:4", "--bits", "4", "--group-size", "128", "--sym"],
         [("", ["--recipe", "sparsegpt-2:4+gptq-w4a16", "--group-size", "128"]),
          (" (workaround: groups of 64)", ["--recipe", "sparsegpt-2:4+gptq-w4a16", "--group-size", "64"])]),
    ]
    rows: list[dict[str, Any]] = []
    base = {"model": source, "calibration": calib_desc, "evaluation": eval_desc}
    common = ["--dataset", str(calib), "--nsamples", str(nsamples), "--seqlen", str(seqlen), "--device", device]
    try:
        for label, ours, peers in configs:
            runs = [("sparsegpt-export", label, [sys.executable, "-c", _OURS, "compress", str(model_dir), *common,
                                                "--seed", "0", "--out", "OUT", "--overwrite", "--no-progress", *ours])]
            for suffix, flags in peers:
                runs.append(("llmcompressor", label + suffix,
                             None if peer is None else [peer, str(PEER_SCRIPT), "--model", str(model_dir),
                                                        "--calib", str(calib), "--nsamples", str(nsamples),
                                                        "--seqlen", str(seqlen), "--device", device,
                                                        "--dtype", "float16" if cuda and not quick else "float32",
                                                        "--out", "OUT", *flags]))
            for i, (tool, cfg_label, cmd) in enumerate(runs):
                row: dict[str, Any] = {"tool": tool, "config": cfg_label, **base}
                rows.append(row)
                if cmd is None:
                    row["skipped"] = f"llmcompressor is not set up: {PEER_HOWTO}"
                    continue
                out = work / f"out-{len(rows)}"
                cmd = [str(out) if c == "OUT" else c for c in cmd]
                env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} if tool != "sparsegpt-export" else None
                rc, wall, rss, output = _subprocess(cmd, work / f"log-{len(rows)}.txt", env)
                row.update(wall_s=round(wall, 2), peak_rss_mb_process=round(rss, 1))
                if tool == "sparsegpt-export":
                    line = [x for x in output.splitlines() if x.startswith("OURS_RESULT ")]
                    res = json.loads(line[-1][12:]) if line else {}
                    if rc != 0 or not line:
                        raise RuntimeError(f"our compress failed (exit {rc}):\n{output[-3000:]}")
                    rep = json.loads((out / "sparsegpt_report.json").read_text())
                    row.update(compress_s=rep["summary"]["wall_s"], mean_rel_error=rep["summary"]["mean_rel_error"],
                               profile_s={k: v for k, v in rep.get("profile", {}).items()
                                          if isinstance(v, (int, float))})
                    if "peak_gpu_mb" in res:
                        row["peak_gpu_mb"] = res["peak_gpu_mb"]
                else:
                    rp = out / "peer_result.json"
                    res = json.loads(rp.read_text()) if rp.is_file() else {
                        "failed": f"exit {rc}: " + " | ".join(output.strip().splitlines()[-3:])}
                    row["peer"] = {k: v for k, v in res.items() if v is not None}
                    if "failed" in res:
                        row["skipped"] = f"llmcompressor failed: {res['failed'][:400]}"
                        print(f"{tool} {cfg_label}: failed: {res['failed'][:200]}", flush=True)
                        continue
                    if "peak_gpu_mb" in res:
                        row["peak_gpu_mb"] = res["peak_gpu_mb"]
                row.update(_nm_violation(out))
                if text is not None or eval_ids is not None:
                    row.update(_perplexity(out, eval_ids, text, windows, eval_seqlen, device))
                print(f"{tool} {cfg_label}: {wall:.1f} s, peak RSS {rss:.0f} MB, ppl {row.get('ppl', '-')}",
                      flush=True)
                shutil.rmtree(out, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"suite": "compress", "env": environment(device), "quick": quick, "rows": rows,
            "peer": {"python": peer} if peer else {"skipped": f"llmcompressor is not set up: {PEER_HOWTO}"}}


def compress_table(res: dict) -> list[str]:
    rows = [r for r in res["rows"]]
    head = rows[0] if rows else {}
    lines = [f"compress on {res['env']['device_name']}: {head.get('model', '')}, calibration "
             f"{head.get('calibration', '')}; perplexity on {head.get('evaluation', '')}", "",
             "| tool | config | wall s | peak RSS MB | peak GPU MB | perplexity | groups of 4 over 2:4 | zeros | "
             "zeros of embedding / lm_head |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "skipped" in r:
            why = " ".join(str(r["skipped"]).split())[:240]  # one table line
            lines.append(f"| {r['tool']} | {r['config']} | {r.get('wall_s', '-')} | | | skipped: {why} | | | |")
            continue
        gpu = f"{r['peak_gpu_mb']:.0f}" if "peak_gpu_mb" in r else "-"
        ppl = f"{r['ppl']:.2f}" if "ppl" in r else "-"
        viol = f"{r['nm_violating_groups']:.4f}" if "nm_violating_groups" in r else "-"
        zeros = f"{r['zero_fraction']:.4f}" if "zero_fraction" in r else "-"
        head = f"{r['head_zero_fraction']:.4f}" if "head_zero_fraction" in r else "-"
        lines.append(f"| {r['tool']} | {r['config']} | {r['wall_s']:.1f} | {r['peak_rss_mb_process']:.0f} | {gpu} | "
                     f"{ppl} | {viol} | {zeros} | {head} |")
    return lines