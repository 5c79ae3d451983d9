"""Load-time choices for one compressed layer: may the kernels run it (else dense, and why), its runtime layout,
and the per-M dispatch table, measured once per distinct layer shape on the GPU against dense ``F.linear``."""
from __future__ import annotations

import os
import statistics
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

from . import layout, ops
from .module import DEFAULT_DISPATCH, DENSE, UNBOUNDED, Sparse24Linear

TUNE_M = (1, 4, 16, 64, 256, 1024, 4096)
CANDIDATES = {"gemv": 16, "tiled": 1024, "decode": UNBOUNDED}  # variant -> the largest M it is tried at
INSTALL_HINT = "pip install 'sparsegpt-export[gpu]'"


def kernel_kind(record: dict, device: torch.device, dtype: torch.dtype) -> tuple[Optional[str], str]:
    """The runtime kind for this layer, or None and the reason it stays dense."""
    if device.type != "cuda":
        return None, "not on a CUDA device"
    if not ops.triton_available():
        return None, f"triton is not installed ({INSTALL_HINT})"
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        return None, f"GPU sm{major}{minor} is older than sm80 (the kernels need Ampere or newer)"
    return shape_kind(record, dtype)


def shape_kind(record: dict, dtype: torch.dtype) -> tuple[Optional[str], str]:
    """The record-level half of `kernel_kind` (pattern, bits, dtype, shape)."""
    if record["pattern"] != "2:4":
        return None, f"pattern {record['pattern']} (the kernels take 2:4 only)"
    if dtype not in (torch.float16, torch.bfloat16):
        return None, f"dtype {str(dtype)[6:]} (the kernels take float16/bfloat16)"
    bits, gs = record.get("bits"), record.get("group_size")
    rows, cols = record["shape"]
    if cols % 4:
        return None, f"{cols} input features are not a multiple of 4"
    if bits not in (None, 4):
        return None, f"{bits}-bit codes (the kernels take 4-bit or unquantized 2:4)"
    if bits and gs and gs % 4:
        return None, f"group size {gs} is not a multiple of 4"
    return (layout.INT4 if bits else layout.FP16), ""


def runtime_tensors(kind: str, stored: dict[str, torch.Tensor], dense: Callable[[], torch.Tensor],
                    dtype: torch.dtype, device: torch.device, in_features: int) -> dict[str, Optional[torch.Tensor]]:
    """The runtime layout from the stored tensors (``dense()`` decodes the layer, for the CUTLASS layout)."""
    if "positions" in stored:  # one check on the device, where the file's own decoder is not run
        pos = layout.unpack_positions(stored["positions"].to(device), in_features // 4)
        if not bool((pos[..., 0] < pos[..., 1]).all()):
            raise ValueError("positions are not ascending indices below 4; the file is corrupt")
    if kind == layout.INT4:
        t = {k: stored[k].to(device).contiguous() for k in ("codes", "positions", "scales")}
        t["zeros"] = stored["zeros"].to(device).contiguous() if "zeros" in stored else None
        return t
    if "positions" in stored:
        return {"values": stored["values"].to(device, dtype).contiguous(),
                "positions": stored["positions"].to(device).contiguous()}
    values, positions = layout.pack_24(dense().to(dtype))  # the CUTLASS layout: decoded once, repacked
    return {"values": values.to(device).contiguous(), "positions": positions.to(device).contiguous()}


def _events_ms(fn: Callable[[], Any], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def _cuda_ms(fn: Callable[[], Any], repeat: int = 10) -> float:
    """GPU time of ``fn`` in ms: its CUDA-graph replay (the compiled static-cache regime, where the host launch
    cost is hidden), or eager where it cannot be captured."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
    except RuntimeError:
        return _events_ms(fn, repeat)
    graph.replay()
    return _events_ms(graph.replay, repeat)


def measure(layer: Sparse24Linear, w: torch.Tensor, ms=TUNE_M, timer: Callable = _cuda_ms) -> dict[int, dict]:
    """Per M: the time (ms) of dense ``F.linear`` on ``w`` and of each candidate variant, each first checked
    against dense (a variant that fails or differs is recorded as such, not timed)."""
    out: dict[int, dict] = {}
    for m in ms:
        x = torch.randn(m, layer.in_features, device=w.device, dtype=w.dtype)
        ref = F.linear(x, w)
        row: dict[str, Any] = {DENSE: timer(lambda: F.linear(x, w))}
        for variant, max_m in CANDIDATES.items():
            if m > max_m:
                continue
            try:
                err = float((layer.matmul(x, variant).float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-12))
            except Exception as e:  # noqa: BLE001 - a kernel that cannot build here is dropped, never raised later
                row[variant] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
                continue
            row[variant] = timer(lambda: layer.matmul(x, variant)) if err < 1e-2 else f"differs from dense ({err:.3g})"
        out[m] = row
    return out


def choose(timings: dict[int, dict]) -> tuple[tuple, str]:
    """The dispatch table from `measure`'s timings, or ``()`` (use dense) and why: the fastest correct variant
    per M; dense for the whole layer when no variant works or dense is faster at the smallest M (decode)."""
    table: list[tuple[int, str]] = []
    for m in sorted(timings):
        row = timings[m]
        ok = {v: t for v, t in row.items() if v != DENSE and isinstance(t, float)}
        if not ok:
            return (), f"no kernel variant ran correctly at M={m} ({'; '.join(f'{v}: {t}' for v, t in row.items() if v != DENSE)})"
        best = min(ok, key=ok.get)
        if m == min(timings) and ok[best] > row[DENSE]:
            return (), f"measured: dense is faster at M={m} ({row[DENSE]:.4f} ms vs {best} {ok[best]:.4f} ms)"
        if table and table[-1][1] == best:
            table[-1] = (m, best)
        else:
            table.append((m, best))
    return tuple(table[:-1]) + ((UNBOUNDED, table[-1][1]),), "measured at load"


def tuning_enabled() -> bool:
    return os.environ.get("SPARSEGPT_KERNEL_TUNE", "1") != "0"


def _kernel_plan(layer: Sparse24Linear, key: tuple, cache: dict) -> tuple[tuple, str, Optional[dict]]:
    """The dispatch table of ``layer`` (shared by every layer with the same ``key``), why, and the timings."""
    if key not in cache:
        w = layer.dense_weight(key[-1])
        if tuning_enabled():
            timings = measure(layer, w)
            cache[key] = (*choose(timings), timings)
        else:  # the default table, each of its variants checked once against dense
            checks = measure(layer, w, ms=tuple(min(m, 64) for m, _ in DEFAULT_DISPATCH), timer=lambda fn: 0.0)
            bad = [f"{v}: {t}" for row in checks.values() for v, t in row.items() if isinstance(t, str)]
            cache[key] = (((), "; ".join(bad)) if bad else (DEFAULT_DISPATCH, "default table (SPARSEGPT_KERNEL_TUNE=0)")) \
                + (None,)
        del w
    return cache[key]


def build_layer(record: dict, stored: dict[str, torch.Tensor], decode: Callable[[], torch.Tensor],
                dtype: torch.dtype, device: torch.device, bias: Optional[torch.Tensor],
                cache: dict) -> tuple[Sparse24Linear, dict]:
    """The `Sparse24Linear` of one stored layer and its load-report row (the path it got, and why).
    ``decode()`` returns the layer's dense weight [out, in] in ``dtype`` on the CPU (the file's own decoder)."""
    rows, cols = record["shape"]
    bias = None if bias is None else bias.detach().to(device, dtype)
    kind, why = kernel_kind(record, device, dtype)
    info: dict[str, Any] = {"pattern": record["pattern"], "bits": record.get("bits")}
    if kind is not None:
        layer = Sparse24Linear(cols, rows, kind, runtime_tensors(kind, stored, decode, dtype, device, cols),
                               record.get("group_size"), bias)
        key = (kind, rows, cols, layer.group_size, getattr(layer, "zeros", None) is None, dtype)
        table, why, timings = _kernel_plan(layer, key, cache)
        if table:
            layer.set_dispatch(table)
            info.update(kernel=kind, dispatch=layer.dispatch_text(), reason=why)
            if timings is not None:
                info["timings_ms"] = {str(m): r for m, r in timings.items()}
            return layer, info
        del layer
    info.update(kernel=DENSE, reason=why)
    return Sparse24Linear(cols, rows, DENSE, {"weight": decode().to(device)}, bias=bias), info


def quantize_24(w: torch.Tensor, group_size: Optional[int] = 128) -> dict[str, Optional[torch.Tensor]]:
    """The int4 2:4 runtime layout of a dense 2:4 weight ``w`` [N, K] (symmetric 4-bit grid per group, float16
    scales), built on ``w``'s device: for benchmarks and for users without a sparse24 file. The weight it stands
    for is ``layout.dense_from_layout(INT4, ...)``, not ``w`` (rounding to the grid)."""
    n, k = w.shape
    values, positions = layout.pack_24(w)
    gs = group_size or k
    ngroups = -(-k // gs)
    pad = torch.zeros(n, ngroups * gs - k, device=w.device, dtype=w.dtype)
    amax = torch.cat([w, pad], dim=1).abs().reshape(n, ngroups, gs).amax(-1).float()
    scales = (amax / 7).clamp_min(1e-8).half()
    kept_group = (torch.arange(k // 2, device=w.device) // 2 * 4) // gs
    s = scales.float()[:, kept_group]
    codes = (torch.round(values.float() / s) + 8).clamp(0, 15).to(torch.int32).reshape(n, k // 4, 2)
    return {"codes": (codes[..., 0] | (codes[..., 1] << 4)).to(torch.uint8), "positions": positions,
            "scales": scales, "zeros": None}


def from_dense(w: torch.Tensor, bits: Optional[int], group_size: Optional[int] = 128,
               bias: Optional[torch.Tensor] = None, cache: Optional[dict] = None,
               cpu_variant: Optional[str] = None) -> tuple[Sparse24Linear, dict]:
    """A `Sparse24Linear` for a dense 2:4 weight on its device (int4 when ``bits == 4``), with the dispatch of
    `build_layer`; dense, and why, where the kernels do not apply. ``cpu_variant`` (e.g. ``"torch"``) runs the
    packed layer on a CPU by that variant alone (harness checks; not a speed path)."""
    n, k = w.shape
    record = {"pattern": "2:4", "bits": bits, "group_size": group_size if bits else None, "shape": [n, k]}
    kind, why = kernel_kind(record, w.device, w.dtype)
    if kind is None and w.device.type == "cpu" and cpu_variant:
        kind, why = shape_kind(record, w.dtype)
    if kind is None:
        return Sparse24Linear(k, n, DENSE, {"weight": w}, bias=bias), {"kernel": DENSE, "reason": why}
    if kind == layout.INT4:
        tensors = quantize_24(w, group_size)
    else:
        tensors = dict(zip(("values", "positions"), layout.pack_24(w)))
    layer = Sparse24Linear(k, n, kind, tensors, group_size if bits else None, bias)
    if w.device.type == "cpu":
        layer.set_dispatch(((UNBOUNDED, cpu_variant),))
        return layer, {"kernel": kind, "dispatch": layer.dispatch_text(), "reason": "CPU: harness check only"}
    table, why, _ = _kernel_plan(layer, (kind, n, k, layer.group_size, True, w.dtype), {} if cache is None else cache)
    if not table:
        return Sparse24Linear(k, n, DENSE, {"weight": w}, bias=bias), {"kernel": DENSE, "reason": why}
    layer.set_dispatch(table)
    return layer, {"kernel": kind, "dispatch": layer.dispatch_text(), "reason": why}
