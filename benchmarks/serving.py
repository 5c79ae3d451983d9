"""Serving rows of ``python -m benchmarks gpu-check``: our 2:4 kernels (`sparsegpt_export.kernels`) against dense
fp16 (cuBLAS) and int4 dense through PyTorch's ``torch._weight_int4pack_mm`` (tinygemm, bf16: the anchor of
gpt-fast and torchao users), per linear shape (eager and CUDA-graph replay, GB/s against the measured copy
bandwidth) and end to end (random Llama built on the device in fp16; eager and compiled static-cache decode)."""
from __future__ import annotations

import copy
import gc
import time
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .harness import rel_error, timed

INT4_GS = 128


def graph_timed(fn: Callable[[], Any], device: str, repeat: int = 20) -> dict[str, float]:
    """``fn`` captured once in a CUDA graph and its replay timed (host launch cost hidden)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return timed(g.replay, device, warmup=3, repeat=repeat)


def copy_bandwidth(device: str) -> float:
    """Device memory bandwidth in GB/s: a 1 GiB device-to-device copy (read + write)."""
    n = (1 << 30) // 2 if device.startswith("cuda") else (1 << 24)
    a, b = torch.empty(n, dtype=torch.float16, device=device), torch.empty(n, dtype=torch.float16, device=device)
    t = timed(lambda: b.copy_(a), device, warmup=3, repeat=10)
    return 2 * a.numel() * a.element_size() / (t["median_ms"] / 1e3) / 1e9


class Int4DenseLinear(nn.Module):
    """int4 dense through ``torch._weight_int4pack_mm`` (tinygemm; bfloat16), symmetric grid per group:
    ``w = (q - 8) * scale``. On a CPU, PyTorch's ``*_for_cpu`` twins (harness checks)."""

    def __init__(self, w: torch.Tensor, group_size: int = INT4_GS):
        super().__init__()
        n, k = w.shape
        wf = w.float().reshape(n, k // group_size, group_size)
        scale = (wf.abs().amax(-1) / 7).clamp_min(1e-8)
        q = (torch.round(wf / scale[..., None]) + 8).clamp(0, 15).to(torch.int32).reshape(n, k)
        self.cuda_ops = w.is_cuda
        if self.cuda_ops:  # two codes a byte, the even column in the high nibble
            packed = torch._convert_weight_to_int4pack(((q[:, ::2] << 4) | q[:, 1::2]).to(torch.uint8), 8)
        else:
            packed = torch._convert_weight_to_int4pack_for_cpu(q, 8)
        self.register_buffer("packed", packed)
        sz = torch.stack([scale, torch.zeros_like(scale)], dim=-1)  # scale and zero (0: symmetric)
        self.register_buffer("scales_and_zeros", sz.transpose(0, 1).contiguous().to(torch.bfloat16))
        self.group_size, self.out_features = group_size, n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1]).to(torch.bfloat16).contiguous()
        mm = torch._weight_int4pack_mm if self.cuda_ops else torch._weight_int4pack_mm_for_cpu
        y = mm(x2, self.packed, self.group_size, self.scales_and_zeros)
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)


def weight_bytes(module: nn.Module) -> int:
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        if t is not None and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def make_layer(variant: str, w: torch.Tensor, cache: dict, cpu_variant: Optional[str]) -> tuple[nn.Module, dict]:
    """One linear of ``variant`` ("dense", "int4 dense (tinygemm)", "fp16 2:4", "int4 2:4") for the dense 2:4
    weight ``w`` (already on the int4 grid for the int4 variants)."""
    from sparsegpt_export.kernels.plan import from_dense

    if variant == "dense":
        lin = nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
        lin.weight = nn.Parameter(w, requires_grad=False)
        return lin, {"kernel": "cuBLAS" if w.is_cuda else "dense"}
    if variant == "int4 dense (tinygemm)":
        return Int4DenseLinear(w), {"kernel": "tinygemm" if w.is_cuda else "tinygemm CPU twin (harness check)"}
    return from_dense(w, 4 if variant == "int4 2:4" else None, INT4_GS, cache=cache, cpu_variant=cpu_variant)


def on_int4_grid(w: torch.Tensor, group_size: int = INT4_GS) -> torch.Tensor:
    """``w`` rounded to the symmetric 4-bit grid of `plan.quantize_24` (what the int4 layers hold)."""
    from sparsegpt_export.kernels import layout
    from sparsegpt_export.kernels.plan import quantize_24

    return layout.dense_from_layout(layout.INT4, quantize_24(w, group_size), w.shape[1], group_size, w.dtype)


GEMM_VARIANTS = ("dense", "int4 dense (tinygemm)", "fp16 2:4", "int4 2:4")


def _cell(layer: nn.Module, x: torch.Tensor, ref: torch.Tensor, device: str, info: dict, bw: float) -> dict:
    """One timed cell: checked against dense first (else skipped, with the error), eager and graph replay."""
    out = layer(x)
    err = rel_error(ref, out)
    if not err <= 2e-2:  # NaN too
        return {**info, "skipped": f"result differs from dense (relative error {err:.3g}); not timed"}
    cell = {**info, "rel_error": err, "eager": timed(lambda: layer(x), device, warmup=3, repeat=20)}
    nbytes = weight_bytes(layer)
    cell["weight_bytes"] = nbytes
    if device.startswith("cuda"):
        cell["graph"] = graph_timed(lambda: layer(x), device)
        cell["graph_gb_s"] = nbytes / (cell["graph"]["median_ms"] / 1e3) / 1e9
        cell["graph_fraction_of_copy_bw"] = cell["graph_gb_s"] / bw
    return cell


def gemm_rows(device: str, shapes: dict, tokens: list[int], deadline: float,
              cpu_variant: Optional[str] = None) -> dict[str, Any]:
    """Per (shape, M): every variant of `GEMM_VARIANTS` in fp16 (tinygemm in bf16), eager and CUDA graph."""
    bw = copy_bandwidth(device)
    rows, cache = [], {}
    for name, (n, k) in shapes.items():
        w = on_int4_grid(_pruned(n, k, device))
        for m in tokens:
            row: dict[str, Any] = {"shape": name, "out": n, "in": k, "tokens": m}
            if time.monotonic() > deadline:
                row["skipped"] = "out of the time budget"
                rows.append(row)
                continue
            x = torch.randn(m, k, device=device, dtype=torch.float16)
            ref = F.linear(x, w)
            for variant in GEMM_VARIANTS:
                try:
                    layer, info = make_layer(variant, w, cache, cpu_variant)
                    row[variant] = _cell(layer, x, ref, device, info, bw)
                except Exception as e:  # noqa: BLE001 - a failing variant is a result, not a crash
                    row[variant] = {"skipped": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"}
            _speedups(row)
            rows.append(row)
            print(gemm_line(row), flush=True)
        del w
    return {"copy_bandwidth_gb_s": bw, "rows": rows}


def _speedups(row: dict) -> None:
    base = row["dense"]
    for v in GEMM_VARIANTS[1:]:
        c = row.get(v, {})
        if "eager" in c and "eager" in base:
            c["x_dense_eager"] = base["eager"]["median_ms"] / c["eager"]["median_ms"]
        if "graph" in c and "graph" in base:
            c["x_dense_graph"] = base["graph"]["median_ms"] / c["graph"]["median_ms"]


def _pruned(n: int, k: int, device: str) -> torch.Tensor:
    g = torch.randn(n, k // 4, 4, device=device, dtype=torch.float16) * 0.02
    idx = g.abs().topk(2, dim=-1).indices
    return torch.zeros_like(g).scatter_(-1, idx, g.gather(-1, idx)).reshape(n, k)


def gemm_line(r: dict) -> str:
    if "skipped" in r:
        return f"{r['shape']:18s} M={r['tokens']:<5d} skipped: {r['skipped']}"
    parts = [f"{r['shape']:18s} M={r['tokens']:<5d}"]
    for v in GEMM_VARIANTS:
        c = r.get(v, {})
        t = c.get("graph", c.get("eager"))
        parts.append(f"{v}: " + (f"{t['median_ms']:.4f} ms" if t else "skipped"))
    return "  ".join(parts)


E2E_VARIANTS = ("int4 2:4", "dense", "int4 dense (tinygemm)", "fp16 2:4")  # the headline rows first


def build_llama(cfg_kwargs: dict, device: str) -> nn.Module:
    """A random Llama built on ``device`` in fp16, every decoder linear pruned 2:4 and put on the int4 g128 grid
    (so that every variant computes with the same weights)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(**cfg_kwargs, max_position_embeddings=4096)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float16).eval()
    with torch.no_grad():
        for _, lin in decoder_linears(model):
            n, k = lin.weight.shape
            g = lin.weight.reshape(n, k // 4, 4)
            idx = g.abs().topk(2, dim=-1).indices
            pruned = torch.zeros_like(g).scatter_(-1, idx, g.gather(-1, idx)).reshape(n, k)
            lin.weight.copy_(on_int4_grid(pruned))
    return model


def decoder_linears(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if ".layers." in n and isinstance(m, nn.Linear)]


def build_layers(model: nn.Module, variant: str, cpu_variant: Optional[str]) -> tuple[dict, dict]:
    """Every decoder linear of ``model`` as a ``variant`` layer ({name: module}) and a summary of their paths."""
    layers, cache, paths = {}, {}, {}
    for name, lin in decoder_linears(model):
        layers[name], info = make_layer(variant, lin.weight.detach(), cache, cpu_variant)
        key = f"{info.get('kernel')}: {info.get('dispatch', '')} ({info.get('reason', '')})".replace(" ()", "")
        paths[key] = paths.get(key, 0) + 1
    return layers, paths


def install(model: nn.Module, layers: dict) -> None:
    """Put ``layers`` ({name: module}) in place, and drop what a compiled forward cached for the previous ones."""
    for name, layer in layers.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer)
    torch._dynamo.reset()
    model.__dict__.pop("_compiled_call", None)


def _generate(model, ids, new_tokens: int, compiled: bool) -> Callable[[], Any]:
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    if compiled:
        kw["cache_implementation"] = "static"
    return lambda: model.generate(ids, **kw)


def _measure(fn: Callable[[], Any], device: str, deadline: float, warmup: int, repeat: int) -> dict:
    if time.monotonic() > deadline:
        return {"skipped": "out of the time budget"}
    try:
        with torch.no_grad():
            return timed(fn, device, warmup=warmup, repeat=repeat)
    except Exception as e:  # noqa: BLE001 - recorded: the row says what failed
        return {"skipped": f"failed: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}


def phases(plan: dict) -> list[tuple[str, Any, Optional[str]]]:
    """The e2e measurements, headline first (so a short budget keeps them): batch-1 compiled decode, the first
    prefill, batch-1 eager decode, then the other decode batches compiled, the other prefills, the rest eager."""
    (b1, *more), (p1, *pre) = plan["decode"], plan["prefill"]
    order = [("decode", b1, "compiled"), ("prefill", p1, None), ("decode", b1, "eager")]
    order += [("decode", b, "compiled") for b in more] + [("prefill", p, None) for p in pre]
    order += [("decode", b, "eager") for b in more]
    return order


def _phase_key(kind: str, arg: Any, mode: Optional[str]) -> str:
    return f"prefill_{arg[0]}x{arg[1]}" if kind == "prefill" else f"decode_b{arg}_{mode}"


def _run_phase(model, kind: str, arg: Any, mode: Optional[str], device: str, plan: dict, deadline: float) -> dict:
    if mode == "compiled" and not device.startswith("cuda"):
        return {"skipped": "compiled static-cache decode (CUDA graphs) needs CUDA"}
    vocab = model.config.vocab_size
    if kind == "prefill":
        ids = torch.randint(0, vocab, arg, device=device)
        return _measure(lambda: model(ids, use_cache=False), device, deadline, 2, plan["repeat"])
    ids = torch.randint(0, vocab, (arg, 16), device=device)
    t = _measure(_generate(model, ids, plan["new_tokens"], mode == "compiled"), device, deadline, 1, plan["repeat"])
    if "median_ms" in t:
        t["tokens_per_s"] = arg * plan["new_tokens"] / (t["median_ms"] / 1e3)
    return t


def _variant_layers(model, variant: str, built: dict, row: dict, cpu_variant: Optional[str]) -> Optional[dict]:
    """The variant's layers, built on first use (weights and paths recorded in ``row``), or None if it failed."""
    if variant not in built:
        try:
            built[variant], paths = build_layers(model, variant, cpu_variant)
        except Exception as e:  # noqa: BLE001
            built[variant] = None
            row["skipped"] = f"failed to build: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            return None
        row["paths"] = paths
        row["linear_weights_gib"] = sum(weight_bytes(m) for m in built[variant].values()) / 2**30
    return built[variant]


def model_rows(model, device: str, plan: dict, deadline: float, cpu_variant: Optional[str]) -> dict[str, dict]:
    """Every variant of `E2E_VARIANTS` through the `phases`, the variant's layers swapped in for each."""
    originals = dict(decoder_linears(model))
    rows: dict[str, dict] = {v: {} for v in E2E_VARIANTS}
    built: dict[str, Optional[dict]] = {"dense": originals}
    rows["dense"].update(paths={"cuBLAS" if device.startswith("cuda") else "dense": len(originals)},
                         linear_weights_gib=sum(weight_bytes(m) for m in originals.values()) / 2**30)
    for kind, arg, mode in phases(plan):
        key = _phase_key(kind, arg, mode)
        for variant in E2E_VARIANTS:
            r = rows[variant]
            layers = _variant_layers(model, variant, built, r, cpu_variant)
            if layers is None:
                continue
            install(model, layers)
            r.setdefault("weights_gib", weight_bytes(model) / 2**30)
            r[key] = _run_phase(model, kind, arg, mode, device, plan, deadline)
            c = r[key]
            print(f"  {variant} {key}: " + (f"{c['tokens_per_s']:.1f} tok/s" if "tokens_per_s" in c else
                                            f"{c['median_ms']:.2f} ms" if "median_ms" in c else c["skipped"]), flush=True)
    install(model, originals)
    return rows


def e2e_rows(device: str, models: dict[str, dict], plan: dict, deadline: float,
             cpu_variant: Optional[str] = None) -> list[dict]:
    rows = []
    for i, (mname, cfg) in enumerate(models.items()):
        now = time.monotonic()
        if now > deadline:
            rows.append({"model": mname, "skipped": "out of the time budget"})
            continue
        # the last (largest) model keeps at least 60% of what is left
        until = deadline if i == len(models) - 1 else now + 0.4 * (deadline - now)
        t0 = time.monotonic()
        try:
            model = build_llama(cfg, device)
        except Exception as e:  # noqa: BLE001 - out of memory, say: the row says so, the check goes on
            rows.append({"model": mname, "skipped": f"failed to build: {type(e).__name__}: {str(e)[:300]}"})
            continue
        row: dict[str, Any] = {"model": mname, "parameters": sum(p.numel() for p in model.parameters()),
                               "build_s": round(time.monotonic() - t0, 1), "dtype": "float16",
                               "note": "random weights pruned 2:4 on the int4 g128 grid; built on the device"}
        print(f"== e2e {mname} built in {row['build_s']} s", flush=True)
        row.update(model_rows(model, device, plan, until, cpu_variant))
        del model
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
        rows.append(row)
    return rows
