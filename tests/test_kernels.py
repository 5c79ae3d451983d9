"""The 2:4 kernels (`sparsegpt_export.kernels`): runtime layout, Triton kernels, custom ops, `Sparse24Linear`
and its load-time choices. Without a GPU the Triton kernels run on CPU tensors in triton's interpreter
(``TRITON_INTERPRET=1``, float16/float32: the interpreter has no bfloat16); every result is checked against the
dense weights decoded by the sparse24 file's own decoder."""
import os
import subprocess
import sys

import pytest
import torch
from conftest import old_interpreter

if not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported

from sparsegpt_export.converters import sparse24  # noqa: E402
from sparsegpt_export.driver import LayerRecord  # noqa: E402
from sparsegpt_export.kernels import Sparse24Linear, build_layer, layout, ops, plan  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# float32 runs in the interpreter (CPU); on a GPU those cases run in bfloat16 (tl.dot would round float32 to tf32)
WIDE = torch.float32 if DEVICE == "cpu" else torch.bfloat16


def _tol(dtype):
    return {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 3e-2}[dtype]
OLD_INTERPRETER = old_interpreter() if DEVICE == "cpu" else None
needs_triton = pytest.mark.skipif(
    not ops.triton_available() or (DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1")
    or OLD_INTERPRETER is not None,
    reason=OLD_INTERPRETER
    or "needs triton (pip install '.[gpu]'), on CPU run with TRITON_INTERPRET=1 set before triton is imported")


def _pruned(n, k, gen):
    g = torch.randn(n, k // 4, 4, generator=gen)
    idx = g.abs().topk(2, dim=-1).indices
    w = torch.zeros_like(g).scatter_(-1, idx, g.gather(-1, idx))
    w[0, 0] = 0  # a group with one nonzero (its free slot holds the zero point)
    return w.reshape(n, k)


def _quantized(w, gs, sym, gen):
    """``w`` put on a 4-bit grid per group of ``gs`` (None: per channel) and its LayerRecord."""
    n, k = w.shape
    size = gs or k
    ngroups = -(-k // size)
    idx = torch.arange(k) // size
    if sym:
        scales = (torch.zeros(n, ngroups).scatter_reduce_(1, idx.expand(n, -1), w.abs(), "amax") / 7).clamp_min(1e-3).half()
        zeros = None
        z = torch.full((n, k), 8.0)
    else:
        scales = (torch.rand(n, ngroups, generator=gen) * 0.2 + 0.1).half()
        zeros = torch.randint(4, 12, (n, ngroups), generator=gen, dtype=torch.uint8)
        z = zeros.float()[:, idx]
    s = scales.float()[:, idx]
    q = (torch.round(w / s) + z).clamp(0, 15)
    wq = torch.where(w != 0, s * (q - z), torch.zeros(()))
    rec = LayerRecord("l", (n, k), "2:4", 0.5, 4, gs, sym, scales, zeros)
    return wq, rec


def _stored(w, rec, dtype=torch.float16):
    """The layer as the sparse24 file stores it, its record dict, and the file decoder's dense weight."""
    t = sparse24.pack_layer("l", rec, w, dtype)
    meta = {"pattern": "2:4", "bits": rec.bits, "group_size": rec.group_size, "sym": rec.sym,
            "shape": list(rec.shape), "source_dtype": "float32",
            "layout": "cutlass" if sparse24.uses_cutlass_layout("2:4", rec.bits, rec.shape, dtype) else "packed"}
    if rec.bits:
        meta["scale_dtype"] = "float16"
    ref = sparse24.unpack_layer("l", meta, lambda sfx: t[sfx])
    return t, meta, ref


def _layer(w, rec, dtype, device=DEVICE, dense_dtype=torch.float16):
    stored, meta, ref = _stored(w, rec, dense_dtype)
    kind = layout.INT4 if rec.bits else layout.FP16
    tensors = plan.runtime_tensors(kind, stored, lambda: ref.to(dtype), dtype, torch.device(device), rec.shape[1])
    return Sparse24Linear(rec.shape[1], rec.shape[0], kind, tensors, rec.group_size), ref


CASES = [  # N, K, group size, sym, M, dtype
    (40, 100, 32, True, 3, torch.float32),   # ragged last group (100 = 3*32 + 4), odd N, odd M
    (72, 136, 64, False, 5, torch.float16),  # asym, ragged
    (33, 64, None, True, 1, torch.float16),  # per channel, M = 1
    (64, 256, 128, False, 17, torch.float32),  # M over 16: the tiled kernel's 32-row blocks; gemv: one scale a tile
    (48, 200, 128, True, 2, torch.float16),  # sym, one scale a gemv tile, the second group ragged
]


@pytest.mark.parametrize("n,k,gs,sym,m,dtype", CASES)
def test_runtime_layout_decodes_like_the_file(n, k, gs, sym, m, dtype):
    gen = torch.Generator().manual_seed(n * k)
    w, rec = _quantized(_pruned(n, k, gen), gs, sym, gen)
    layer, ref = _layer(w, rec, dtype, device="cpu")
    assert torch.equal(layer.dense_weight(torch.float32), ref.float())
    assert layer.codes.shape == (n, k // 4) and layer.positions.shape == (n, -(-k // 8))
    # fp16 2:4: values + positions from a dense weight, and back
    values, positions = layout.pack_24(ref)
    back = layout.dense_from_layout(layout.FP16, {"values": values, "positions": positions}, k, None, torch.float32)
    assert torch.equal(back, ref.float())


@needs_triton
@pytest.mark.parametrize("n,k,gs,sym,m,dtype", CASES)
@pytest.mark.parametrize("variant", ["gemv", "tiled", "decode"])
def test_int4_24_kernels_match_the_decoded_weights(n, k, gs, sym, m, dtype, variant):
    dtype = WIDE if dtype == torch.float32 else dtype
    gen = torch.Generator().manual_seed(n + k + m)
    w, rec = _quantized(_pruned(n, k, gen), gs, sym, gen)
    layer, ref = _layer(w, rec, dtype)
    x = torch.randn(m, k, generator=gen).to(DEVICE, dtype)
    got = torch.ops.sparsegpt.int4_24_mm(x, layer.codes, layer.positions, layer.scales, layer.zeros,
                                         layer.group_size, variant)
    want = x.float() @ ref.to(DEVICE, dtype).float().t()
    assert got.dtype == dtype and got.shape == (m, n)
    tol = _tol(dtype)
    torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol * want.abs().max().item())


@needs_triton
@pytest.mark.parametrize("n,k,m,dtype,cutlass", [(40, 100, 3, torch.float32, False), (64, 128, 2, torch.float16, True),
                                                  (96, 200, 24, torch.float16, False)])
@pytest.mark.parametrize("variant", ["gemv", "tiled", "decode"])
def test_fp16_24_kernels_match_the_decoded_weights(n, k, m, dtype, cutlass, variant):
    dtype = WIDE if dtype == torch.float32 else dtype
    gen = torch.Generator().manual_seed(n + m)
    w = _pruned(n, k, gen).to(dtype).float()
    rec = LayerRecord("l", (n, k), "2:4", 0.5, None, None, True)
    layer, ref = _layer(w, rec, dtype, dense_dtype=torch.float16 if cutlass else dtype)
    stored, meta, _ = _stored(w, rec, torch.float16 if cutlass else dtype)
    assert (meta["layout"] == "cutlass") == cutlass  # the CUTLASS layout is repacked at load
    x = torch.randn(m, k, generator=gen).to(DEVICE, dtype)
    got = torch.ops.sparsegpt.fp16_24_mm(x, layer.values, layer.positions, variant)
    want = x.float() @ ref.to(DEVICE, dtype).float().t()
    tol = _tol(dtype)
    torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol * want.abs().max().item())


@needs_triton
def test_gemv_split_k_and_small_blocks():
    gen = torch.Generator().manual_seed(5)
    n, k = 50, 232  # 58 groups: split into 3 slices of 24 (the last one short), 16-row blocks (the last one short)
    w, rec = _quantized(_pruned(n, k, gen), 48, False, gen)
    layer, ref = _layer(w, rec, torch.float32)
    x = torch.randn(2, k, generator=gen).to(DEVICE)
    got = ops._launch_gemv(x, layer.codes, layer.positions, layer.scales, layer.zeros, 48, True, split_k=3,
                           block_n=16, block_g=8)
    torch.testing.assert_close(got, x @ ref.to(DEVICE).t(), rtol=1e-4, atol=1e-4)
    w, rec = _quantized(_pruned(n, k, gen), 32, True, gen)  # groups of 32 hold whole 8-group tiles: TILE_SCALE
    layer, ref = _layer(w, rec, torch.float32)
    got = ops._launch_gemv(x, layer.codes, layer.positions, layer.scales, None, 32, True, split_k=3, block_n=16,
                           block_g=8)
    torch.testing.assert_close(got, x @ ref.to(DEVICE).t(), rtol=1e-4, atol=1e-4)
    # the last slice's tiles past the last group must read no scale: NaN just past each row's scales shows a read
    padded = torch.full((n, layer.scales.shape[1] + 1), float("nan"), device=DEVICE, dtype=layer.scales.dtype)
    padded[:, :-1] = layer.scales
    got = ops._launch_gemv(x, layer.codes, layer.positions, padded[:, :-1], None, 32, True, split_k=3, block_n=16,
                           block_g=8)
    torch.testing.assert_close(got, x @ ref.to(DEVICE).t(), rtol=1e-4, atol=1e-4)
    assert ops.gemv_split(n_blocks=1, m=1, groups=58, block_g=8, device=torch.device("cpu")) > 1


def _module_checks(layer, ref, dtype, bias):
    gen = torch.Generator().manual_seed(1)
    tol = _tol(dtype)
    w = ref.to(DEVICE, dtype)
    cases = [torch.randn(2, 3, w.shape[1], generator=gen),  # 3-D: 6 rows
             torch.randn(w.shape[1], 20, generator=gen).t(),  # a transposed (non-contiguous) view: 20 rows
             torch.randn(1, 1, w.shape[1], generator=gen)]
    for x in cases:
        x = x.to(DEVICE, dtype) if x.is_contiguous() else x.t().to(DEVICE, dtype).t()
        want = torch.nn.functional.linear(x.float(), w.float(), None if bias is None else bias.float())
        got = layer(x)
        assert got.shape == (*x.shape[:-1], w.shape[0]) and got.dtype == dtype
        torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol * want.abs().max().item())
    assert layer(torch.zeros(0, w.shape[1], device=DEVICE, dtype=dtype)).shape == (0, w.shape[0])


@needs_triton
def test_sparse24_linear_shapes_strides_bias_and_dispatch(monkeypatch):
    gen = torch.Generator().manual_seed(2)
    w, rec = _quantized(_pruned(48, 96, gen), 32, True, gen)
    layer, ref = _layer(w, rec, WIDE)
    layer.bias = torch.nn.Parameter(torch.randn(48, generator=gen).to(DEVICE, WIDE), requires_grad=False)
    layer.set_dispatch(((1, "gemv"), (8, "tiled"), (9, "decode")))
    assert [layer.variant_for(m) for m in (1, 6, 8, 20)] == ["gemv", "tiled", "tiled", "decode"]
    used = []
    real = layer.matmul
    monkeypatch.setattr(layer, "matmul", lambda x2, v: used.append(v) or real(x2, v))
    _module_checks(layer, ref, WIDE, layer.bias)
    assert used == ["tiled", "decode", "gemv"]  # 6, 20 and 1 rows


def test_sparse24_linear_torch_path_compiles_and_ops_check():
    """The custom ops' fake implementations: opcheck, and a full-graph torch.compile (aot_eager) of the module."""
    gen = torch.Generator().manual_seed(3)
    w, rec = _quantized(_pruned(32, 64, gen), 32, False, gen)
    layer, ref = _layer(w, rec, torch.float32, device="cpu")
    layer.set_dispatch(((1 << 62, "torch"),))
    x = torch.randn(2, 5, 64, generator=gen)
    torch.library.opcheck(torch.ops.sparsegpt.int4_24_mm.default,
                          (x[0], layer.codes, layer.positions, layer.scales, layer.zeros, 32, "torch"))
    values, positions = layout.pack_24(ref)
    torch.library.opcheck(torch.ops.sparsegpt.fp16_24_mm.default, (x[0], values, positions, "torch"))
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), x @ ref.t(), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="unknown kernel variant"):
        torch.ops.sparsegpt.fp16_24_mm(x[0], values, positions, "nope")
    with pytest.raises(ValueError, match="bad dispatch table"):
        layer.set_dispatch(((4, "gemv"), (2, "tiled")))


def test_fallback_reasons(monkeypatch):
    base = {"pattern": "2:4", "bits": 4, "group_size": 128, "sym": True, "shape": [64, 256]}
    fp16 = torch.float16
    assert plan.kernel_kind(base, torch.device("cpu"), fp16) == (None, "not on a CUDA device")
    assert plan.shape_kind(base, fp16) == (layout.INT4, "")
    assert plan.shape_kind({**base, "bits": None}, torch.bfloat16) == (layout.FP16, "")
    assert "4:8" in plan.shape_kind({**base, "pattern": "4:8"}, fp16)[1]
    assert "8-bit" in plan.shape_kind({**base, "bits": 8}, fp16)[1]
    assert "float32" in plan.shape_kind(base, torch.float32)[1]
    assert "not a multiple of 4" in plan.shape_kind({**base, "shape": [64, 254]}, fp16)[1]
    assert "group size 30" in plan.shape_kind({**base, "group_size": 30}, fp16)[1]
    cuda = torch.device("cuda")
    monkeypatch.setattr(ops, "triton_available", lambda: False)
    assert "triton is not installed" in plan.kernel_kind(base, cuda, fp16)[1]
    monkeypatch.setattr(ops, "triton_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (7, 5))
    assert plan.kernel_kind(base, cuda, fp16)[1].startswith("GPU sm75 is older than sm80")


def test_dispatch_choice_never_keeps_a_slower_or_broken_kernel():
    t = {1: {"dense": 0.05, "gemv": 0.02, "tiled": 0.04, "decode": 0.07},
         16: {"dense": 0.05, "gemv": 0.03, "tiled": 0.025, "decode": 0.07},
         64: {"dense": 0.06, "gemv": "failed: x", "tiled": 0.05, "decode": 0.08},
         4096: {"dense": 0.9, "decode": 0.95}}
    table, why = plan.choose(t)
    assert table == ((1, "gemv"), (64, "tiled"), (1 << 62, "decode")) and why == "measured at load"
    assert plan.choose({**t, 1: {"dense": 0.01, "gemv": 0.02}})[0] == ()
    assert "dense is faster at M=1" in plan.choose({**t, 1: {"dense": 0.01, "gemv": 0.02}})[1]
    table, why = plan.choose({1: {"dense": 0.01, "gemv": "differs from dense (0.5)"}})
    assert table == () and "no kernel variant ran correctly at M=1" in why and "differs" in why


def test_build_layer_on_cpu_is_dense_with_the_reason_and_corrupt_positions_fail():
    gen = torch.Generator().manual_seed(4)
    w, rec = _quantized(_pruned(32, 64, gen), 32, True, gen)
    stored, meta, ref = _stored(w, rec)
    layer, info = build_layer(meta, stored, lambda: ref.half(), torch.float16, torch.device("cpu"), None, {})
    assert layer.kind == "dense" and info == {"pattern": "2:4", "bits": 4, "kernel": "dense",
                                              "reason": "not on a CUDA device"}
    assert torch.equal(layer.weight, ref.half())
    bad = dict(stored, positions=stored["positions"].clone())
    bad["positions"][3, 1] = 0  # group 2 and 3 of row 3: slots (0, 0)
    with pytest.raises(ValueError, match="positions are not ascending"):
        plan.runtime_tensors(layout.INT4, bad, lambda: ref, torch.float16, torch.device("cpu"), 64)


def test_package_imports_without_triton():
    code = ("import sys; sys.modules['triton'] = None\n"
            "import torch, sparsegpt_export, sparsegpt_export.kernels as k\n"
            "from sparsegpt_export.kernels import ops, plan\n"
            "assert not ops.triton_available()\n"
            "rec = {'pattern': '2:4', 'bits': 4, 'group_size': 128, 'sym': True, 'shape': [64, 256]}\n"
            "print(plan.kernel_kind(rec, torch.device('cuda'), torch.float16)[1])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "triton is not installed" in out.stdout


@pytest.mark.skipif(not ops.triton_available(), reason="needs triton (pip install '.[gpu]')")
def test_kernels_compile_for_sm90_without_a_gpu():
    """triton's compiler and ptxas take every kernel (the interpreter does not check what the compiler rejects)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(sys.path)
    out = subprocess.run([sys.executable, "-m", "sparsegpt_export.kernels.aot", "--arch", "90"], capture_output=True,
                         text=True, timeout=600, env=env)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    lines = [line for line in out.stdout.splitlines() if line.startswith("sm90")]
    assert len(lines) == 11 and all("cubin" in line for line in lines), out.stdout
    assert sum(line.startswith("sm90 sweep") for line in lines) == 4  # the column sweep's block kernel


def test_from_dense_int4_and_fp16_layouts():
    gen = torch.Generator().manual_seed(6)
    w = _pruned(24, 72, gen)  # 72 = 2 groups of 32 + a ragged 8
    layer, info = plan.from_dense(w.half(), 4, 32, cpu_variant="torch")
    assert info["kernel"] == layout.INT4 and layer.codes.dtype == torch.uint8 and layer.scales.shape == (24, 3)
    back = layer.dense_weight(torch.float32)
    assert bool(((back != 0) <= (w != 0)).all())  # the 2:4 mask is kept
    err = (back - w).abs() / layer.scales.float().repeat_interleave(32, 1)[:, :72]
    assert float(err.max()) <= 0.5 + 1e-3  # within half a grid step
    x = torch.randn(3, 72, generator=gen).half()
    torch.testing.assert_close(layer(x).float(), x.float() @ back.half().float().t(), rtol=2e-2, atol=2e-2)
    fp16, info = plan.from_dense(w.half(), None, cpu_variant="torch")
    assert info["kernel"] == layout.FP16 and torch.equal(fp16.dense_weight(), w.half())
    dense, info = plan.from_dense(w.half(), 4)
    assert dense.kind == "dense" and info["reason"] == "not on a CUDA device"


def test_compiled_static_cache_generate_through_packed_layers():
    """transformers' compiled static-cache decode (full graph; the aot_eager backend on a CPU) traces
    `Sparse24Linear` and the custom ops, and gives the eager tokens."""
    from transformers import CompileConfig

    from conftest import make_model

    model = make_model("llama").half()
    for name, lin in [(n, m) for n, m in model.named_modules() if ".layers." in n and isinstance(m, torch.nn.Linear)]:
        w = lin.weight.detach()
        g = w.reshape(w.shape[0], -1, 4)
        idx = g.abs().topk(2, dim=-1).indices
        w = torch.zeros_like(g).scatter_(-1, idx, g.gather(-1, idx)).reshape(w.shape)
        layer, info = plan.from_dense(w, 4, 32, cpu_variant="torch")
        assert info["kernel"] == layout.INT4
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer)
    ids = torch.randint(0, 256, (2, 6), generator=torch.Generator().manual_seed(0))
    kw = dict(max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
    eager = model.generate(ids, **kw)
    cc = CompileConfig(backend="aot_eager", fullgraph=True)
    cc._compile_all_devices = True  # transformers compiles on GPUs only unless told
    torch._dynamo.reset()
    compiled = model.generate(ids, cache_implementation="static", compile_config=cc, **kw)
    assert torch.equal(eager, compiled)
    assert hasattr(model, "_compiled_call")  # the decode step did go through torch.compile


@needs_triton
@pytest.mark.skipif(DEVICE == "cuda", reason="on a GPU, tests/test_cuda.py loads onto the kernels for real")
@pytest.mark.parametrize("bits", ["4", "none"])
def test_loader_puts_every_layer_on_the_kernels(saved_tiny, tmp_path, monkeypatch, bits):
    """``from_pretrained`` with the device check lifted (as on a GPU): every 2:4 layer stays packed and runs on the
    Triton kernels (interpreted here) with the default dispatch; logits match the file's dense decode."""
    from transformers import AutoModelForCausalLM

    from conftest import compress_tiny

    monkeypatch.setattr(plan, "kernel_kind", lambda record, device, dtype: plan.shape_kind(record, dtype))
    monkeypatch.setenv("SPARSEGPT_KERNEL_TUNE", "0")
    comp = tmp_path / "c"
    assert compress_tiny(saved_tiny, comp, "--pattern", "2:4", "--bits", bits, "--asym") == 0
    s24 = sparse24.export(comp, tmp_path / "s24", dtype="float16")
    model = AutoModelForCausalLM.from_pretrained(str(s24))
    report = model.sparsegpt_load_report
    assert report["kernels"] == 14 and report["dense"] == 0, report
    kind = layout.INT4 if bits == "4" else layout.FP16
    for r in report["layers"]:
        assert r["kernel"] == kind and r["dispatch"] == "gemv M<=16, tiled M<=256, decode above", r
        assert isinstance(model.get_submodule(r["layer"]), Sparse24Linear)
    reference = sparse24.load_model(s24)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = model(ids).logits.float(), reference(ids).logits.float()
    torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)
