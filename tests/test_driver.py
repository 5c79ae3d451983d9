import pytest
import torch
from torch import nn

from conftest import ARCHS, make_model, nm_holds
from sparsegpt_export.config import ConfigError, SparseGPTConfig
from sparsegpt_export.anatomy import UnsupportedModelError, block_linears, find_blocks, get_weight
from sparsegpt_export.pipeline import compress_model
from sparsegpt_export.solver import SolverError, expand_groups


def _cfg(**kw):
    base = dict(pattern="2:4", bits=4, group_size=32, nsamples=8, seqlen=32)
    base.update(kw)
    return SparseGPTConfig(**base)


def _check_grid(w, rec):
    scale, zero = expand_groups(rec.scales.float(), (rec.zeros.float() if rec.zeros is not None else
                                                     torch.full_like(rec.scales.float(), 2 ** (rec.bits - 1))),
                                w.shape[1], rec.group_size)
    codes = w.float() / scale + zero
    return torch.allclose(codes, codes.round(), atol=1e-3) and float(codes.min()) > -1e-3 and float(codes.max()) < 2**rec.bits - 1 + 1e-3


@pytest.mark.parametrize("arch", ARCHS)
def test_every_architecture(arch, calib):
    model = make_model(arch)
    embed_before = model.get_input_embeddings().weight.clone()
    head_before = model.get_output_embeddings().weight.clone()
    res = compress_model(model, calib, _cfg(), progress=False)
    path, blocks = find_blocks(model)
    names = [f"{path}.{i}.{k}" for i, b in enumerate(blocks) for k in block_linears(b)]
    assert set(res.records) | {r["layer"] for r in res.report["layers"] if r["pattern"] == "skipped"} == set(names)
    assert res.records, arch
    mods = dict(model.named_modules())
    for name, rec in res.records.items():
        w = get_weight(mods[name])
        assert nm_holds(w, 2, 4), name
        assert _check_grid(w, rec), name
    assert torch.equal(model.get_input_embeddings().weight, embed_before)
    if model.get_output_embeddings().weight is not model.get_input_embeddings().weight:
        assert torch.equal(model.get_output_embeddings().weight, head_before)
    with torch.no_grad():
        assert torch.isfinite(model(calib[:2]).logits).all()


def test_gpt2_conv1d_is_pruned_along_inputs(calib):
    model = make_model("gpt2")
    compress_model(model, calib, _cfg(bits=None), progress=False)
    conv = model.transformer.h[0].mlp.c_fc  # Conv1D: weight stored [in, out]
    assert type(conv).__name__ == "Conv1D"
    assert nm_holds(conv.weight.data.t(), 2, 4)


def test_report_rows(calib):
    model = make_model("llama")
    res = compress_model(model, calib, _cfg(), progress=False)
    row = res.report["layers"][0]
    for key in ("layer", "pattern", "sparsity", "bits", "rel_error", "damp", "time_s"):
        assert key in row
    assert row["sparsity"] == 0.5 and 0 < row["rel_error"] < 1
    assert res.report["summary"]["weighted_sparsity"] == pytest.approx(0.5)


def test_sub_sequential_order_feeds_compressed_outputs(calib):
    """o_proj's Hessian must come from the compressed q/k/v: the result differs from a dense-input schedule."""
    m1 = make_model("llama")
    compress_model(m1, calib, _cfg(bits=None), progress=False)
    m2 = make_model("llama")
    compress_model(m2, calib, _cfg(bits=None, ignore=[r"o_proj|mlp"]), progress=False)
    # q/k/v are identical (same inputs), and the ignored layers were left dense
    a, b = m1.model.layers[0].self_attn.q_proj.weight, m2.model.layers[0].self_attn.q_proj.weight
    assert torch.equal(a, b)
    assert float((m2.model.layers[0].mlp.down_proj.weight == 0).float().mean()) < 0.01


@pytest.mark.parametrize("kw", [dict(), dict(quant_order="joint"), dict(hessian_dtype="float64"),
                                dict(bits=None, pattern="unstructured")], ids=["after-mask", "joint", "h64", "50pct"])
def test_chunked_is_bit_identical_to_one_forward(calib, kw):
    """Issue #28: windows in chunks of 3 give the very weights of one forward over all 8 (the Hessians are formed
    the same way whatever the split), with the default float32 Hessians too."""
    m1, m2 = make_model("llama"), make_model("llama")
    r1 = compress_model(m1, calib, _cfg(calib_batch_size=8, **kw), progress=False)
    r2 = compress_model(m2, calib, _cfg(calib_batch_size=3, **kw), progress=False)
    for (n1, p1), (n2, p2) in zip(m1.named_parameters(), m2.named_parameters()):
        assert n1 == n2
        assert torch.equal(p1, p2), n1
    assert r2.report["calib_batch_size"] == 3
    for a, b in zip(r1.records.values(), r2.records.values()):
        assert a.scales is None or torch.equal(a.scales, b.scales)


def test_first_chunk_runs_in_the_calling_thread(calib, monkeypatch):
    """Issue #25: a forward in a worker thread pays a page fault for every large tensor (glibc's thread arenas), so
    the first chunk runs in the calling thread: one chunk starts no thread; 3 chunks (8 windows by 3) start threads
    only for the second and third, and give the one-chunk weights."""
    import threading

    started = []
    real_start = threading.Thread.start

    def start(self):
        if self.name == "sparsegpt-chunk":
            started.append(self)
        return real_start(self)

    monkeypatch.setattr(threading.Thread, "start", start)
    m1, m2 = make_model("llama"), make_model("llama")
    compress_model(m1, calib, _cfg(calib_batch_size=8), progress=False)
    assert started == []
    compress_model(m2, calib, _cfg(calib_batch_size=3), progress=False)
    blocks = len(find_blocks(m2)[1])
    assert len(started) == 2 * blocks  # chunks 2 and 3 of each block, one forward each
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(p1, p2)


def test_chunk_runs_are_freed_without_the_cycle_collector(calib):
    """A block's chunk runs hold its input activations: nothing may keep them in a reference cycle, or every block's
    inputs stay alive until Python's cycle collector runs (SmolLM2: 151 MB more per block)."""
    import gc

    from sparsegpt_export.pipeline.blockrun import BlockRun, ChunkRun

    gc.collect()
    gc.disable()
    try:
        for batch in (8, 3):  # one chunk (in the calling thread), and chunks in threads too
            compress_model(make_model("llama"), calib, _cfg(calib_batch_size=batch), progress=False)
            alive = [type(o).__name__ for o in gc.get_objects() if isinstance(o, (BlockRun, ChunkRun))]
            assert alive == [], (batch, alive)
    finally:
        gc.enable()


def test_same_seed_bit_identical(calib):
    m1, m2 = make_model("llama"), make_model("llama")
    compress_model(m1, calib, _cfg(), progress=False)
    compress_model(m2, calib, _cfg(), progress=False)
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(p1, p2)


def test_sparsity_zero_no_quant_bit_identical(calib):
    model = make_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    compress_model(model, calib, _cfg(pattern="unstructured", sparsity=0.0, bits=None), progress=False)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_unstructured_exact_ratio(calib):
    model = make_model("llama")
    res = compress_model(model, calib, _cfg(pattern="unstructured", sparsity=0.6, bits=None), progress=False)
    mods = dict(model.named_modules())
    for name in res.records:
        w = get_weight(mods[name])
        assert int((w == 0).sum()) == round(0.6 * w.numel()), name


def test_targets_and_ignore(calib):
    model = make_model("llama")
    res = compress_model(model, calib, _cfg(targets=[r"mlp\."], ignore=[r"down_proj"]), progress=False)
    assert res.records and all(("gate_proj" in n or "up_proj" in n) for n in res.records)


def test_columns_not_multiple_of_m_skip_or_error(calib):
    # hidden 64 and intermediate 128 are not multiples of 24: every layer is skipped with a warning
    model = make_model("llama")
    with pytest.warns(UserWarning, match="not a multiple of M=24"):
        res = compress_model(model, calib, _cfg(pattern="3:24", bits=None), progress=False)
    skipped = [r for r in res.report["layers"] if r["pattern"] == "skipped"]
    assert skipped and all("not a multiple of M=24" in r["warning"] for r in skipped)
    assert res.report["warnings"]
    with pytest.raises(SolverError, match=r"model\.layers\.0\..*not a multiple of M=24"):
        compress_model(make_model("llama"), calib, _cfg(pattern="3:24", bits=None, on_incompatible="error"), progress=False)


def test_nan_activation_names_layer(calib):
    model = make_model("llama")
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight[0, 0] = float("nan")
    with pytest.raises(SolverError, match=r"layer model\.layers\.0\.self_attn\.o_proj"):
        compress_model(model, calib, _cfg(targets=["o_proj"]), progress=False)


def test_unsupported_architecture(calib):
    class NotALM(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)

    with pytest.raises(UnsupportedModelError, match="NotALM"):
        compress_model(NotALM(), calib, _cfg(), progress=False)
    from transformers import T5Config, T5ForConditionalGeneration

    t5 = T5ForConditionalGeneration(T5Config(vocab_size=32, d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8))
    with pytest.raises(UnsupportedModelError, match="T5ForConditionalGeneration"):
        compress_model(t5, calib, _cfg(), progress=False)


def test_bad_calibration_shape(calib):
    with pytest.raises(ConfigError, match="nsamples, seqlen"):
        compress_model(make_model("llama"), calib[0], _cfg(), progress=False)


def test_resume_after_interruption_is_identical(calib, tmp_path):
    ref = make_model("llama")
    compress_model(ref, calib, _cfg(), progress=False)

    model = make_model("llama")
    ckpt = tmp_path / "ckpt"
    # interrupt inside the second block
    target = model.model.layers[1].mlp.up_proj

    def boom(*_):
        raise KeyboardInterrupt

    h = target.register_forward_pre_hook(boom)
    with pytest.raises(KeyboardInterrupt):
        compress_model(model, calib, _cfg(), progress=False, checkpoint_dir=ckpt)
    h.remove()
    assert (ckpt / "state.json").is_file()
    fresh = make_model("llama")  # a new process would start from the dense weights
    res = compress_model(fresh, calib, _cfg(), progress=False, checkpoint_dir=ckpt, resume=True)
    for (n, p1), p2 in zip(ref.named_parameters(), fresh.parameters()):
        assert torch.equal(p1, p2), n
    assert len(res.records) == 14
    with pytest.raises(ConfigError, match="another model, configuration"):
        compress_model(make_model("llama"), calib, _cfg(pattern="4:8"), progress=False, checkpoint_dir=ckpt, resume=True)


@pytest.mark.parametrize("order", ["after-mask", "joint"])
def test_quant_order(order, calib):
    """after-mask: the first layer's mask is exactly the unquantized sweep's, then the kept weights sit on the grid;
    its error (against the original weight) is above the unquantized one. joint: pattern and grid hold too."""
    plain, quant = make_model("llama"), make_model("llama")
    r0 = compress_model(plain, calib, _cfg(bits=None), progress=False)
    r1 = compress_model(quant, calib, _cfg(quant_order=order), progress=False)
    first = "model.layers.0.self_attn.q_proj"
    w0, w1 = get_weight(dict(plain.named_modules())[first]), get_weight(dict(quant.named_modules())[first])
    if order == "after-mask":
        assert torch.equal(w0 == 0, w1 == 0) or bool(((w1 == 0) & (w0 != 0)).sum() < 0.02 * w1.numel())
        assert torch.equal((w0 == 0) & (w1 == 0), w0 == 0)  # every pruned weight stays pruned
    mods = dict(quant.named_modules())
    for name, rec in r1.records.items():
        assert nm_holds(get_weight(mods[name]), 2, 4) and _check_grid(get_weight(mods[name]), rec), name
    e0 = {r["layer"]: r["rel_error"] for r in r0.report["layers"]}
    e1 = {r["layer"]: r["rel_error"] for r in r1.report["layers"]}
    assert e1[first] > e0[first]
    assert r1.report["config"]["quant_order"] == order


def test_quant_order_is_validated():
    with pytest.raises(ConfigError, match="quant_order"):
        _cfg(quant_order="later")


@pytest.mark.parametrize("arch,pattern,bits", [("llama", "2:4", 4), ("opt", "4:8", None), ("qwen2", "dense", 4)])
def test_stacked_shared_inputs_give_the_layer_by_layer_result(calib, arch, pattern, bits):
    """q/k/v and gate/up solved in one sweep over their stacked rows: every weight bit-identical to solving them
    one by one, the same per-layer errors, and the partners named in the report."""
    results = []
    for stack in (True, False):
        model = make_model(arch)
        cfg = SparseGPTConfig(pattern=pattern, bits=bits, group_size=16 if bits else None, stack_shared_inputs=stack)
        rep = compress_model(model, calib, cfg, progress=False).report
        results.append((model.state_dict(), rep["layers"]))
    (sd_s, rows_s), (sd_1, rows_1) = results
    assert all(torch.equal(sd_s[k], sd_1[k]) for k in sd_1)
    stacked = [r for r in rows_s if "stacked_with" in r]
    assert len(stacked) >= 3 * 2 and not any("stacked_with" in r for r in rows_1)  # q/k/v of both blocks at least
    assert any(r["layer"].endswith("q_proj") and len(r["stacked_with"]) == 2 for r in stacked)
    by_name = {r["layer"]: r for r in rows_1}
    for r in rows_s:
        assert r["rel_error"] == pytest.approx(by_name[r["layer"]]["rel_error"], rel=1e-6, abs=1e-12)
        assert r["sparsity"] == by_name[r["layer"]]["sparsity"]


def test_unstructured_layers_are_never_stacked(calib):
    """An unstructured mask ranks the weights of all rows together: stacking would change it, so it is not done."""
    rep = compress_model(make_model("llama"), calib, SparseGPTConfig(pattern="unstructured", sparsity=0.5, bits=None),
                         progress=False).report
    assert rep["layers"] and not any("stacked_with" in r for r in rep["layers"])
