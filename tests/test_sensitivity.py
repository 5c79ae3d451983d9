"""Issue #7: sensitivity scores, per-matrix sparsity allocation, ISC saliency, the ADMM update, mixed N:M."""
from __future__ import annotations

import json
import types

import pytest
import torch
from torch import nn

from conftest import make_model, save_tiny
from sparsegpt_export import sensitivity as sens
from sparsegpt_export.config import ConfigError, SparseGPTConfig
from sparsegpt_export.pipeline import compress_model
from sparsegpt_export.quant import QuantSpec
from sparsegpt_export.solver import HessianAccumulator, admm_prune, layer_error, sparsegpt_solve


def _cfg(**kw):
    return SparseGPTConfig(dataset=None, nsamples=8, seqlen=32, **kw)


def _weighted(report) -> float:
    rows = [r for r in report["layers"] if "sparsity" in r]
    numel = [r["shape"][0] * r["shape"][1] for r in rows]
    return sum(r["sparsity"] * n for r, n in zip(rows, numel)) / sum(numel)


# ---------------------------------------------------------------------------------------------- allocation
@pytest.mark.parametrize("allocation,method", [("uniform", None), ("sensitivity", "proxy"), ("sensitivity", "fisher"), ("sensitivity", "obd"),
                                              ("sensitivity", "hutchinson"), ("owl", None)])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_weighted_average_sparsity_equals_target(arch, allocation, method, calib):
    kw = dict(pattern="unstructured", sparsity=0.7, bits=None, allocation=allocation, probes=2)
    if method:
        kw["sensitivity"] = method
    r = compress_model(make_model(arch), calib, _cfg(**kw), progress=False)
    rows = [x for x in r.report["layers"] if "sparsity" in x]
    assert abs(_weighted(r.report) - 0.7) < 1e-3  # the masks round each matrix to whole weights
    assert all(0.0 <= x["sparsity"] <= 0.99 for x in rows)
    if allocation != "uniform":
        assert max(x["sparsity"] for x in rows) - min(x["sparsity"] for x in rows) > 0.05  # really mixed
        assert all("score" in x and "allocated_sparsity" in x for x in rows)
        assert r.report["allocation"]["method"] == allocation


def test_sensitivity_allocation_by_hand():
    numel = {"a": 100, "b": 100, "c": 200}
    scores = {"a": 3.0, "b": 1.0, "c": 2.0}  # b least sensitive: pruned most
    sp, notes = sens.allocate("sensitivity", 0.5, numel, scores=scores, alpha=0.1)
    # densities by rank b, c, a: 0.4, 0.5, 0.6; weighted mean (40 + 60 + 100) / 400 = 0.5 already
    assert sp == pytest.approx({"b": 0.6, "c": 0.5, "a": 0.4}, abs=1e-9) and notes == []
    scores = {"a": 1.0, "b": 2.0, "c": 3.0}  # c (200 weights) most sensitive: 0.4, 0.5, 0.6 + c, c = -0.025
    sp, _ = sens.allocate("sensitivity", 0.5, numel, scores=scores, alpha=0.1)
    assert sp == pytest.approx({"a": 0.625, "b": 0.525, "c": 0.425}, abs=1e-9)


def test_owl_allocation_by_hand():
    assert sens.outlier_ratio([torch.tensor([[1.0, 1.0], [1.0, 10.0]])], [torch.ones(2)], m=2.0) == 0.25
    assert sens.outlier_ratio([torch.tensor([[1.0, 1.0], [1.0, 10.0]])], [torch.ones(2)], m=5.0) == 0.0
    numel = {"l0.q": 10, "l1.q": 10, "l2.q": 10}
    blocks = {"l0.q": "l0", "l1.q": "l1", "l2.q": "l2"}
    sp, notes = sens.allocate("owl", 0.5, numel, blocks=blocks, outliers={"l0": 0.01, "l1": 0.03, "l2": 0.02},
                              owl_lambda=0.08)
    # densities 2*lambda*(r - min)/span = 0, 0.16, 0.08, centred on 0.5: 0.42, 0.58, 0.50
    assert sp == pytest.approx({"l0.q": 0.58, "l1.q": 0.42, "l2.q": 0.5}, abs=1e-9) and notes == []


def test_alpha_that_leaves_the_range_is_clipped_and_said():
    numel = {k: 10 for k in "abcde"}
    scores = {k: float(i) for i, k in enumerate("abcde")}
    sp, notes = sens.allocate("sensitivity", 0.3, numel, scores=scores, alpha=0.5)
    assert notes and "clipped" in notes[0]
    assert all(0.0 <= v <= 0.99 for v in sp.values())
    assert sum(sp.values()) / 5 == pytest.approx(0.3, abs=1e-9)
    assert sp["e"] == 0.0 and sp["a"] > sp["b"] > sp["c"]


def test_bad_allocation_inputs():
    with pytest.raises(ConfigError, match="sparsity"):
        _cfg(pattern="unstructured", sparsity=1.0, allocation="sensitivity")
    with pytest.raises(ConfigError, match="sparsity"):
        _cfg(pattern="unstructured", sparsity=-0.1)
    with pytest.raises(ConfigError, match="N:M"):
        _cfg(pattern="2:4", allocation="owl")
    with pytest.raises(ConfigError, match="dense_fraction"):
        _cfg(pattern="unstructured", dense_fraction=0.1)
    with pytest.raises(ConfigError, match="alpha"):
        _cfg(pattern="unstructured", alpha=1.5)
    with pytest.raises(sens.SensitivityError, match="allocation"):
        sens.allocate("magic", 0.5, {"a": 1, "b": 1})


# ---------------------------------------------------------------------------------------------- scores
class _TinyLM(nn.Module):
    """A causal LM small enough for an exact Hessian: embedding, two linear layers, tanh."""

    def __init__(self, vocab=16, hidden=6, inner=10):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.embed = nn.Embedding(vocab, hidden)
        self.up = nn.Linear(hidden, inner)
        self.down = nn.Linear(inner, vocab)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
        self.double()

    def forward(self, input_ids, labels=None, use_cache=False):
        logits = self.down(torch.tanh(self.up(self.embed(input_ids))))
        loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
        return types.SimpleNamespace(loss=loss, logits=logits)


def test_hutchinson_matches_the_exact_hessian_trace():
    model = _TinyLM()
    ids = torch.randint(0, 16, (1, 24), generator=torch.Generator().manual_seed(1))
    names = ["up", "down"]
    est = sens.estimate(model, names, ids, method="hutchinson", probes=256, seed=0)
    for name in names:
        w = getattr(model, name).weight

        def loss(x, name=name):
            return torch.func.functional_call(model, {name + ".weight": x}, (ids,), {"labels": ids}).loss

        H = torch.autograd.functional.hessian(loss, w.detach().clone()).reshape(w.numel(), w.numel())
        exact = float(H.diagonal().sum())
        assert abs(exact) > 1e-3
        assert abs(est[name] - exact) / abs(exact) < 0.10, (name, est[name], exact)


def test_scores_are_deterministic_for_a_seed(calib):
    model = make_model("llama")
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in n]
    a = sens.estimate(model, names, calib, method="hutchinson", probes=2, seed=3)
    b = sens.estimate(model, names, calib, method="hutchinson", probes=2, seed=3)
    c = sens.estimate(model, names, calib, method="hutchinson", probes=2, seed=4)
    assert a == b and a != c
    assert sorted(a, key=a.get) == sorted(b, key=b.get)


def test_obd_is_the_mean_fisher_saliency_of_the_weights(calib):
    # one window: fisher = sum g^2, obd = mean (g w)^2 over the matrix, both from the same gradient
    model = make_model("llama")
    names = ["model.layers.0.mlp.up_proj", "model.layers.1.self_attn.q_proj"]
    one = calib[:1]
    fisher = sens.estimate(model, names, one, method="fisher", probes=1, seed=0)
    obd = sens.estimate(model, names, one, method="obd", probes=1, seed=0)
    params = [model.get_submodule(n).weight for n in names]
    loss = sens._loss(model, one)
    grads = torch.autograd.grad(loss, params)
    for n, g, w in zip(names, grads, params):
        assert fisher[n] == pytest.approx(float(g.pow(2).sum()), rel=1e-4)
        assert obd[n] == pytest.approx(float((g * w.detach()).pow(2).mean()), rel=1e-4)
        assert obd[n] > 0
    assert obd != fisher


def test_too_few_tokens_for_the_probes():
    with pytest.raises(sens.SensitivityError, match="at least 2 tokens"):
        sens.estimate(make_model("llama"), ["model.layers.0.mlp.up_proj"], torch.zeros(4, 1, dtype=torch.long),
                      method="fisher", probes=2)


def test_sensitivity_cache_reused_and_recomputed_for_another_model(tmp_path, calib):
    cache = tmp_path / "scores.json"
    kw = dict(pattern="unstructured", sparsity=0.6, bits=None, allocation="sensitivity", probes=2)
    r1 = compress_model(make_model("llama"), calib, _cfg(**kw), progress=False, sensitivity_cache=cache)
    assert "written" in r1.report["allocation"]["cache"] and cache.exists()
    r2 = compress_model(make_model("llama"), calib, _cfg(**{**kw, "sparsity": 0.7}), progress=False,
                        sensitivity_cache=cache)
    assert "reused" in r2.report["allocation"]["cache"]
    assert [x["score"] for x in r1.report["layers"]] == [x["score"] for x in r2.report["layers"]]
    r3 = compress_model(make_model("qwen2"), calib, _cfg(**kw), progress=False, sensitivity_cache=cache)
    assert "another model" in r3.report["allocation"]["cache"] and "recomputed" in r3.report["allocation"]["cache"]
    assert any("recomputed" in w for w in r3.report["warnings"])


# ---------------------------------------------------------------------------------------------- saliency, ADMM
def _layer(seed=0, rows=64, cols=128):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(2048, cols, generator=g) @ (torch.eye(cols) + 0.3 * torch.randn(cols, cols, generator=g))
    acc = HessianAccumulator(cols)
    acc.add(X)
    return torch.randn(rows, cols, generator=g), acc.H


def test_isc_saliency_changes_the_mask_and_keeps_the_pattern():
    W, H = _layer()
    obs = sparsegpt_solve(W, H, n=2, m=4)
    isc = sparsegpt_solve(W, H, n=2, m=4, saliency="isc")
    assert not torch.equal(obs.mask, isc.mask)
    assert (isc.mask.reshape(64, -1, 4).sum(-1) == 2).all()
    un = sparsegpt_solve(W, H, sparsity=0.6, saliency="isc")
    assert un.mask.sum().item() == round(0.6 * W.numel())


@pytest.mark.parametrize("n,m,sparsity", [(2, 4, 0.5), (4, 8, 0.5), (0, 0, 0.6)])
def test_admm_beats_obs_on_the_same_mask_and_keeps_mask_and_grid(n, m, sparsity):
    W, H = _layer(1)
    obs = sparsegpt_solve(W, H, n=n, m=m, sparsity=sparsity)
    Wa, mask = admm_prune(W, H, n=n, m=m, sparsity=sparsity, mask=obs.mask)
    assert torch.equal(mask, obs.mask)
    assert layer_error(Wa, W, H) <= obs.rel_error
    # started from the sweep's weights: never above them, however few the iterations
    for iters in (1, 3, 10):
        Wi, _ = admm_prune(W, H, n=n, m=m, sparsity=sparsity, mask=obs.mask, init=obs.weight, iters=iters)
        assert layer_error(Wi, W, H) <= obs.rel_error * (1 + 1e-6)
    assert (Wa[mask] == 0).all()
    spec = QuantSpec(4, 32, True, torch.float16)
    q = sparsegpt_solve(Wa, H, mask=mask, quant=spec)
    assert torch.equal(q.mask, mask) and (q.weight[mask] == 0).all()
    codes = q.codes(spec).float()
    assert codes.min() >= 0 and codes.max() <= spec.maxq
    scale = q.scales.repeat_interleave(32, dim=1)[:, :W.shape[1]]
    assert torch.equal(q.weight, (codes - 8) * scale)  # every weight on its group's grid
    # the gradual mask: exact pattern, error below OBS's
    Wg, mg = admm_prune(W, H, n=n, m=m, sparsity=sparsity)
    if n:
        assert ((~mg).reshape(W.shape[0], -1, m).sum(-1) == n).all()
    else:
        assert mg.sum().item() == round(sparsity * W.numel())
    assert layer_error(Wg, W, H) < obs.rel_error
    # ADMM's objective is not above the sweep's on ADMM's own mask (the sweep given that mask)
    assert layer_error(Wg, W, H) <= sparsegpt_solve(W, H, mask=mg).rel_error
    assert (Wg[mg] == 0).all()


def test_admm_nm_is_row_by_row_whatever_the_threads():
    """N:M ADMM is row separable: rows solved in slices on threads, or a share of the rows alone, give the whole
    matrix's result bit for bit (what ranks and stacked layers rely on)."""
    W, H = _layer(2, rows=192)
    whole = admm_prune(W, H, n=2, m=4, iters=12, mask_steps=9)
    for workers in (2, 3):
        part = admm_prune(W, H, n=2, m=4, iters=12, mask_steps=9, workers=workers)
        assert torch.equal(part[0], whole[0]) and torch.equal(part[1], whole[1])
    rows = admm_prune(W[64:128], H, n=2, m=4, iters=12, mask_steps=9)
    assert torch.equal(rows[0], whole[0][64:128]) and torch.equal(rows[1], whole[1][64:128])


def test_admm_in_the_driver_reports_its_gain(calib):
    r = compress_model(make_model("llama"), calib, _cfg(pattern="2:4", update="admm", refine_steps=8, admm_mask="obs",
                                                        stack_shared_inputs=False),
                       progress=False)
    rows = [x for x in r.report["layers"] if "admm_rel_error" in x]
    assert len(rows) == 14
    assert all(x["admm_rel_error"] <= x["obs_rel_error"] for x in rows)
    assert r.report["summary"]["admm_error_reduction_mean"] > 0
    assert r.report["summary"]["weighted_sparsity"] == pytest.approx(0.5)


# ---------------------------------------------------------------------------------------------- N:M choices
def test_dense_fraction_and_mixed_patterns_by_sensitivity(calib, tmp_path):
    cfg = _cfg(pattern="2:4", bits=4, group_size=32, dense_fraction=0.15, mix_pattern="4:8", mix_fraction=0.25,
               sensitivity="proxy")
    model = make_model("llama")
    r = compress_model(model, calib, cfg, progress=False)
    rows = {x["layer"]: x for x in r.report["layers"]}
    scores = {k: v["score"] for k, v in rows.items()}
    dense, mixed = r.report["allocation"]["dense"], r.report["allocation"]["mixed"]
    assert len(dense) == 2 and len(mixed) == 3  # round(0.15 * 14), round(0.25 * 12)
    assert min(scores[k] for k in dense) >= max(scores[k] for k in rows if k not in dense)
    for k, x in rows.items():
        want = "dense" if k in dense else ("4:8" if k in mixed else "2:4")
        assert x["pattern"] == want and r.records[k].pattern == want
        assert (x["sparsity"] == 0) == (k in dense)
    # the serving export takes the mixed checkpoint layer by layer and loads back to the same logits
    from sparsegpt_export.converters.sparse24 import export as export24, load_model as load24
    from sparsegpt_export.io import save_compressed
    from conftest import byte_tokenizer

    d = save_compressed(model, byte_tokenizer(), r, tmp_path / "mixed")
    out = export24(d, tmp_path / "mixed-24")
    back = load24(out)
    ids = calib[:2]
    with torch.no_grad():
        assert torch.allclose(back(ids).logits.float(), model(ids).logits.float(), atol=1e-3, rtol=1e-3)
    from sparsegpt_export.converters.compressed_tensors import export as export_ct

    ct = export_ct(d, tmp_path / "mixed-ct")
    text = " ".join(f.read_text() for f in ct.glob("*.json"))
    for k in dense + mixed:
        assert k in text
    assert '"4:8"' in text and '"dense"' in text and '"2:4"' in text


# ---------------------------------------------------------------------------------------------- CLI
def test_cli_allocation_and_plot(tmp_path):
    pytest.importorskip("matplotlib")
    from sparsegpt_export.cli import main

    d, cal = save_tiny(tmp_path)
    out = tmp_path / "owl"
    rc = main(["compress", str(d), "--out", str(out), "--dataset", str(cal), "--nsamples", "8", "--seqlen", "32",
               "--pattern", "unstructured", "--sparsity", "0.6", "--allocation", "owl", "--bits", "none",
               "--no-progress"])
    assert rc == 0
    report = json.loads((out / "sparsegpt_report.json").read_text())
    assert report["config"]["allocation"] == "owl" and abs(_weighted(report) - 0.6) < 1e-3
    assert main(["plot-sparsity", str(out)]) == 0
    png = out / "sparsity.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["plot-sparsity", str(tmp_path / "nowhere")]) != 0
