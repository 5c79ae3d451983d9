"""Mixture-of-experts: fused 3-D experts (Mixtral, Qwen3-MoE, gpt-oss layouts) compressed expert by expert."""
import json

import pytest
import torch

import sparsegpt_export  # noqa: F401  (registers the sparse24 loader)
from conftest import nm_holds
from sparsegpt_export import SparseGPTQuantizer, moe
from sparsegpt_export.converters import sparse24
from sparsegpt_export.io import load_records
from sparsegpt_export.solver import expand_groups

COMMON = dict(vocab_size=272, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=128, head_dim=16, num_experts_per_tok=2)


def tiny_moe(kind: str, seed: int = 0):
    from transformers import AutoModelForCausalLM, GptOssConfig, MixtralConfig, Qwen3MoeConfig

    cfg = {
        "mixtral": lambda: MixtralConfig(**COMMON, num_local_experts=4),
        "qwen3_moe": lambda: Qwen3MoeConfig(**COMMON, num_experts=4, moe_intermediate_size=64, decoder_sparse_step=1),
        "gpt_oss": lambda: GptOssConfig(**COMMON, num_local_experts=4),
    }[kind]()
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


def calib(n=4, seqlen=16, seed=1):
    return torch.randint(0, 256, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def compress(model):
    q = SparseGPTQuantizer(pattern="2:4", bits=4, group_size=32, dataset=calib(), nsamples=4, seqlen=16)
    q.quantize_model(model, progress=False)
    return q


def expert_matrices(model, report):
    """{<param>.<e>: [out, in] view} for every fused expert matrix, oriented as the report says."""
    out = {}
    for name, p in model.named_parameters():
        if p.dim() == 3:
            info = report["moe"]["params"][name]
            for e in range(p.shape[0]):
                out[f"{name}.{e}"] = p.data[e].t() if info["transposed"] else p.data[e]
    return out


def on_grid(w, rec):
    s, _ = expand_groups(rec.scales.float(), rec.scales.float(), w.shape[1], rec.group_size)
    q = w.float() / s
    return bool(((q - q.round()).abs() < 1e-3).all() and (q.round().abs() <= 8).all())


@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe", "gpt_oss"])
def test_every_fused_expert_matrix_is_compressed(kind):
    model = tiny_moe(kind)
    routers = {n: p.detach().clone() for n, p in model.named_parameters() if ".gate." in n or "router" in n}
    assert routers
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.dim() == 3}
    q = compress(model)
    report, experts = q.report, q.result.expert_records
    mats = expert_matrices(model, report)
    assert len(mats) == 2 * 2 * 4  # 2 blocks x (gate_up, down) x 4 experts
    assert set(mats) == set(experts)
    for name, w in mats.items():
        assert nm_holds(w, 2, 4), name
        assert 0.49 <= float((w == 0).float().mean()) <= 0.55, name
        assert on_grid(w, experts[name]), name
    for name, p in model.named_parameters():
        if name in before:
            assert not torch.equal(p, before[name]), name
        if name in routers:
            assert torch.equal(p, routers[name]), f"router {name} changed"
    rows = {r["layer"]: r for r in report["layers"]}
    for name in mats:  # a report row per expert matrix, with its token count and Hessian
        enough = rows[name]["tokens"] >= moe.MIN_TOKENS
        assert rows[name]["pattern"] == "2:4"
        assert rows[name]["hessian"] == ("routed" if enough else "all tokens (fallback)"), name
    # the tokens routed to the experts of a layer add up to tokens x top-k
    for layer in {n.rsplit(".", 2)[0] for n in mats}:
        counts = [x["tokens"] for x in report["moe"]["experts"] if x["layer"].startswith(layer + ".gate_up_proj.")]
        assert sum(counts) == 4 * 16 * 2, layer
    assert report["summary"]["layers_compressed"] == len(mats) + 2 * 4  # + q, k, v, o per block


def test_an_expert_without_tokens_gets_the_fallback_hessian():
    model = tiny_moe("gpt_oss")
    for layer in model.model.layers:  # expert 3 is never chosen
        layer.mlp.router.bias.data[3] = -1e4
    q = compress(model)
    log = {x["layer"]: x for x in q.report["moe"]["experts"]}
    starved = [n for n, x in log.items() if x["expert"] == 3]
    assert len(starved) == 4
    for n in starved:
        assert log[n]["tokens"] == 0 and log[n]["hessian"] == "all tokens (fallback)"
    mats = expert_matrices(model, q.report)
    for n in starved:
        assert nm_holds(mats[n], 2, 4) and on_grid(mats[n], q.result.expert_records[n])
    assert all(x["hessian"] == "routed" for n, x in log.items() if x["expert"] != 3)
    assert q.report["moe"]["min_tokens"] == moe.MIN_TOKENS and "fallback" in q.report["moe"]


def test_fused_experts_export_and_load(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_moe("mixtral")
    q = compress(model)
    ids = calib(2, 12, seed=5)
    with torch.no_grad():
        ref = model(ids).logits
    q.save(model, tmp_path / "c")
    recs = load_records(tmp_path / "c", key="experts")
    assert set(recs) == set(q.result.expert_records)
    assert all(torch.equal(recs[n].scales, r.scales) for n, r in q.result.expert_records.items())
    assert not any("experts" in n for n in load_records(tmp_path / "c"))  # converters see linear layers only
    s24 = sparse24.export(tmp_path / "c", tmp_path / "s24", dtype="float32")
    qc = json.loads((s24 / "config.json").read_text())["quantization_config"]
    assert set(qc["dense_params"]) == {f"model.layers.{i}.mlp.experts.{p}" for i in range(2)
                                       for p in ("gate_up_proj", "down_proj")}
    loaded = AutoModelForCausalLM.from_pretrained(str(s24)).eval()
    with torch.no_grad():
        got = loaded(ids).logits
    assert torch.allclose(got, ref, rtol=0, atol=1e-5 * float(ref.abs().max()))
    dense = {r["layer"]: r for r in loaded.sparsegpt_load_report["layers"] if r["layer"] in qc["dense_params"]}
    assert len(dense) == 4 and all("stored dense" in r["reason"] for r in dense.values())
    for n, w in expert_matrices(loaded, q.report).items():
        assert nm_holds(w, 2, 4), n


def test_fused_experts_with_chunked_calibration():
    """Windows in chunks (the staged schedule): the experts see every chunk's tokens."""
    model = tiny_moe("mixtral")
    q = SparseGPTQuantizer(pattern="2:4", bits=4, group_size=32, dataset=calib(), nsamples=4, seqlen=16,
                           calib_batch_size=1)
    q.quantize_model(model, progress=False)
    assert q.report["calib_batch_size"] == 1
    mats = expert_matrices(model, q.report)
    assert len(mats) == 16 and all(nm_holds(w, 2, 4) for w in mats.values())
    counts = [x["tokens"] for x in q.report["moe"]["experts"] if x["layer"].startswith("model.layers.0.mlp.experts.gate_up")]
    assert sum(counts) == 4 * 16 * 2
