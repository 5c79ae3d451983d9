"""Activation smoothing before compression (`sparsegpt_export.smoothing`, ``smooth_alpha``)."""
import pytest
import torch

from conftest import make_model, nm_holds
from sparsegpt_export import smoothing
from sparsegpt_export.config import ConfigError, SparseGPTConfig
from sparsegpt_export.anatomy import find_blocks, first_hidden
from sparsegpt_export.pipeline import compress_model
from sparsegpt_export.pipeline.capture import capture_block_inputs


def _with_outliers(arch: str):
    """A tiny model whose norm outputs and down_proj inputs have outlier channels, as real LLMs do."""
    model = make_model(arch)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight[[3, 17]] *= 40.0
            layer.post_attention_layernorm.weight[5] *= 40.0
            layer.mlp.up_proj.weight[[7, 9]] *= 30.0
    return model


def _q_input_ratio(model, ids) -> float:
    """max / median of the RMS of the first q_proj's input channels."""
    got = {}
    h = model.model.layers[0].self_attn.q_proj.register_forward_pre_hook(
        lambda m, a: got.__setitem__("x", a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        model(ids)
    h.remove()
    rms = got["x"].pow(2).mean(0).sqrt()
    return float(rms.max() / rms.median())


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_smoothing_keeps_the_function_and_flattens_outliers(arch, calib):
    model = _with_outliers(arch)
    ids = calib[:4]
    with torch.no_grad():
        want = model(ids).logits
    before = _q_input_ratio(model, ids)
    _, blocks = find_blocks(model)
    assert [p[1] for p in smoothing.plan(blocks[0])] == ["input_layernorm", "post_attention_layernorm", "mlp.up_proj",
                                                         "self_attn.v_proj"]
    chunks = capture_block_inputs(model, blocks, calib, 8, torch.device("cpu"))
    o_before = blocks[0].self_attn.o_proj.weight.clone()
    for block in blocks:
        factors = smoothing.smooth_block(block, chunks, 0.5)
        assert set(factors) == {"self_attn.q_proj+self_attn.k_proj+self_attn.v_proj", "mlp.gate_proj+mlp.up_proj",
                                "mlp.down_proj", "self_attn.o_proj"}
        with torch.no_grad():
            chunks = [(first_hidden(block(hs, **kw)), kw) for hs, kw in chunks]
    with torch.no_grad():
        got = model(ids).logits
    assert float((got - want).norm() / want.norm()) < 1e-5  # the same function
    after = _q_input_ratio(model, ids)
    assert after < before / 3, (before, after)  # the outlier channels pulled in
    # o_proj's columns move together for the query heads that share a key/value head
    heads, kv = model.config.num_attention_heads, model.config.num_key_value_heads
    ratio = (blocks[0].self_attn.o_proj.weight / o_before)[0].view(kv, heads // kv, -1)
    assert torch.allclose(ratio, ratio[:, :1].expand_as(ratio), rtol=1e-5)


def test_compress_with_smoothing(calib):
    cfg = SparseGPTConfig(pattern="2:4", bits=4, group_size=32, nsamples=8, seqlen=32, smooth_alpha=0.5)
    assert SparseGPTConfig.from_dict(cfg.to_dict()).smooth_alpha == 0.5
    plain = _with_outliers("llama")
    smooth = _with_outliers("llama")
    ids = calib[:4]
    with torch.no_grad():
        dense = plain(ids).logits
    compress_model(plain, calib, SparseGPTConfig(**{**cfg.to_dict(), "smooth_alpha": 0.0}), progress=False)
    res = compress_model(smooth, calib, cfg, progress=False)
    rep = res.report["smoothing"]
    assert rep["alpha"] == 0.5 and [b["block"] for b in rep["blocks"]] == [0, 1]
    assert max(rep["blocks"][0]["max_abs_log2_factor"].values()) > 1  # some channel moved by more than 2x
    mods = dict(smooth.named_modules())
    for name in res.records:
        assert nm_holds(mods[name].weight, 2, 4), name
    assert _q_input_ratio(smooth, ids) < _q_input_ratio(plain, ids) / 3
    with torch.no_grad():
        got = smooth(ids).logits
    assert torch.isfinite(got).all() and float((got - dense).norm() / dense.norm()) < 1.0


def test_smoothing_bad_input(calib):
    with pytest.raises(ConfigError, match="smooth_alpha"):
        SparseGPTConfig(smooth_alpha=1.5)
    with pytest.raises(ConfigError, match="smooth_alpha"):
        SparseGPTConfig(smooth_alpha=True)
    with pytest.raises(ConfigError, match="smooth_lm_head_alpha"):
        SparseGPTConfig(smooth_lm_head_alpha=-0.1)
    assert SparseGPTConfig(smooth_alpha=0.6).lm_head_smoothing(0.6) == 0.3
    assert SparseGPTConfig(smooth_alpha=0.6, smooth_lm_head_alpha=0.6).lm_head_smoothing(0.6) == 0.6
    assert SparseGPTConfig(smooth_alpha=0.6, smooth_lm_head_alpha=0).lm_head_smoothing(0.6) == 0.0
    with pytest.raises(ConfigError, match="smooth_alpha"):
        SparseGPTConfig(smooth_alpha="auto")  # the library spells auto None; the command line takes "auto"
    with pytest.raises(ConfigError, match=r"smooth_alpha: block model\.decoder\.layers\.0 \(OPTDecoderLayer\)"):
        compress_model(make_model("opt"), calib, SparseGPTConfig(pattern="2:4", bits=4, group_size=32, nsamples=8,
                                                                 seqlen=32, smooth_alpha=0.5), progress=False)


def test_auto_smoothing(calib):
    """The default (None, "auto"): SMOOTH_AUTO on Llama-style blocks with bits, nothing without bits or on blocks
    that lack the norm pairs (OPT), and the export's accuracy level follows the report."""
    from sparsegpt_export.config import SMOOTH_AUTO

    cfg = SparseGPTConfig(pattern="2:4", bits=4, group_size=32, nsamples=8, seqlen=32)
    assert cfg.smooth_alpha is None and SparseGPTConfig.from_dict(cfg.to_dict()).smooth_alpha is None
    assert cfg.resolved_smooth_alpha(True) == SMOOTH_AUTO and cfg.resolved_smooth_alpha(False) == 0.0
    assert SparseGPTConfig(bits=None).resolved_smooth_alpha(True) == 0.0
    assert SparseGPTConfig(smooth_alpha=0.0).resolved_smooth_alpha(True) == 0.0
    res = compress_model(_with_outliers("llama"), calib, cfg, progress=False)
    rep = res.report["smoothing"]
    assert rep["alpha"] == SMOOTH_AUTO and rep["auto"] is True and [b["block"] for b in rep["blocks"]] == [0, 1]
    plain = compress_model(_with_outliers("llama"), calib, SparseGPTConfig.from_dict({**cfg.to_dict(), "bits": None}),
                           progress=False)
    assert "smoothing" not in plain.report
    opt = compress_model(make_model("opt"), calib, cfg, progress=False)  # no norm pairs: not smoothed, no error
    assert "smoothing" not in opt.report and opt.report["summary"]["layers_compressed"] > 0


def test_cli_smooth_alpha(tmp_path, capsys):
    import json

    from conftest import compress_tiny, save_tiny

    saved = save_tiny(tmp_path, "llama")
    assert compress_tiny(saved, tmp_path / "c", "--smooth-alpha", "0.6") == 0
    assert json.loads((tmp_path / "c" / "sparsegpt_config.json").read_text())["smooth_alpha"] == 0.6
    report = json.loads((tmp_path / "c" / "sparsegpt_report.json").read_text())
    assert report["smoothing"]["alpha"] == 0.6 and len(report["smoothing"]["blocks"]) == 2
    assert compress_tiny(saved, tmp_path / "h", "--smooth-alpha", "0.6", "--quantize-lm-head",
                         "--smooth-lm-head-alpha", "0.3") == 0
    report = json.loads((tmp_path / "h" / "sparsegpt_report.json").read_text())
    assert report["smoothing"]["lm_head_alpha"] == 0.3 and report["smoothing"]["blocks"][-1]["block"] == "lm_head"
    assert json.loads((tmp_path / "h" / "sparsegpt_config.json").read_text())["smooth_lm_head_alpha"] == 0.3
    assert compress_tiny(saved, tmp_path / "off", "--smooth-alpha", "0") == 0
    assert "smoothing" not in json.loads((tmp_path / "off" / "sparsegpt_report.json").read_text())
    assert compress_tiny(saved, tmp_path / "auto", "--smooth-alpha", "auto") == 0
    assert json.loads((tmp_path / "auto" / "sparsegpt_config.json").read_text())["smooth_alpha"] is None
    assert compress_tiny(saved, tmp_path / "bad", "--smooth-alpha", "2") == 2
    assert "smooth_alpha" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_smooth_head_with_quantized_lm_head(calib):
    from sparsegpt_export.anatomy import untie_lm_head

    model = _with_outliers("llama")
    with torch.no_grad():
        model.model.norm.weight[[1, 30]] *= 40.0
    ids = calib[:4]
    with torch.no_grad():
        want = model(ids).logits
        hidden = model.model(ids).last_hidden_state  # after the final norm
    rms = hidden.reshape(-1, hidden.shape[-1]).pow(2).mean(0).sqrt()
    untie_lm_head(model)  # (the tiny configs do not tie it; SmolLM2 does)
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    raw = []  # the last block's outputs: what the driver hands over (the final norm comes after)
    h = model.model.layers[-1].register_forward_hook(lambda m, a, o: raw.append(o[0] if isinstance(o, tuple) else o))
    with torch.no_grad():
        model.model(calib[:8])
    h.remove()
    factor = smoothing.smooth_head(model.model.norm, model.lm_head, raw, 0.6)
    assert factor is not None and factor > 1
    with torch.no_grad():
        got = model(ids).logits
        after = model.model(ids).last_hidden_state
    assert float((got - want).norm() / want.norm()) < 1e-5
    rms2 = after.reshape(-1, after.shape[-1]).pow(2).mean(0).sqrt()
    assert float(rms2.max() / rms2.median()) < float(rms.max() / rms.median()) / 3
    cfg = SparseGPTConfig(pattern="2:4", bits=4, group_size=32, nsamples=8, seqlen=32, smooth_alpha=0.6,
                          quantize_lm_head=True)
    res = compress_model(_with_outliers("llama"), calib, cfg, progress=False)
    assert res.report["smoothing"]["blocks"][-1]["block"] == "lm_head"
    assert res.report["smoothing"]["lm_head_alpha"] == 0.3  # half of smooth_alpha unless told
    # smooth_lm_head_alpha 0: the blocks are smoothed, the final norm -> lm_head pair is not
    base = _with_outliers("llama")
    norm_before = base.model.norm.weight.detach().clone()
    cfg0 = SparseGPTConfig.from_dict({**cfg.to_dict(), "smooth_lm_head_alpha": 0.0})
    res0 = compress_model(base, calib, cfg0, progress=False)
    assert [b["block"] for b in res0.report["smoothing"]["blocks"]] == [0, 1]
    assert res0.report["smoothing"]["lm_head_alpha"] == 0.0
    assert torch.equal(base.model.norm.weight, norm_before)
    # and the head alone, with the blocks left as they are
    cfg_head = SparseGPTConfig.from_dict({**cfg.to_dict(), "smooth_alpha": 0.0, "smooth_lm_head_alpha": 0.5})
    base = _with_outliers("llama")
    res_head = compress_model(base, calib, cfg_head, progress=False)
    assert [b["block"] for b in res_head.report["smoothing"]["blocks"]] == ["lm_head"]
    assert not torch.equal(base.model.norm.weight, norm_before)
