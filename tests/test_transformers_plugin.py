"""The transformers route: ``import sparsegpt_export`` then ``from_pretrained`` / ``pipeline`` on a sparse24 export."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import sparsegpt_export  # noqa: F401  (registers quant_method "sparsegpt")
from conftest import compress_tiny, save_tiny
from sparsegpt_export.converters import dense, sparse24
from sparsegpt_export.kernels import Sparse24Linear

CASES = {
    "2:4-int4": ("--pattern", "2:4", "--bits", "4"),
    "2:4-int4-asym": ("--pattern", "2:4", "--bits", "4", "--asym"),
    "2:4-fp16-cutlass-layout": ("--pattern", "2:4", "--bits", "none"),
    "4:8-fp": ("--pattern", "4:8", "--bits", "none"),
    "unstructured-int4": ("--pattern", "unstructured", "--bits", "4"),
}
LAYER = "model.layers.1.mlp.up_proj"


def _outputs(model, ids):
    with torch.no_grad():
        logits = model(ids).logits.float()
        gen = model.generate(ids[:1], max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
    return logits, gen


@pytest.mark.parametrize("case", list(CASES))
def test_from_pretrained_equals_the_compressed_model(saved_tiny, tmp_path, case):
    from transformers import AutoModelForCausalLM

    comp = tmp_path / "c"
    assert compress_tiny(saved_tiny, comp, *CASES[case]) == 0
    s24 = sparse24.export(comp, tmp_path / "s24")
    layers = json.loads((s24 / "config.json").read_text())["quantization_config"]["layers"]
    if case == "2:4-fp16-cutlass-layout":
        assert layers[LAYER]["layout"] == "cutlass"
        assert f"{LAYER}.meta" in load_file(str(s24 / sparse24.WEIGHTS_FILE))

    model = AutoModelForCausalLM.from_pretrained(str(s24))
    layer = model.get_submodule(LAYER)
    assert model.dtype == torch.float16 and isinstance(layer, Sparse24Linear) and layer.kind == "dense"
    # decoded once at load: bit-identical to the compress output cast to float16
    ref = load_file(str(comp / "model.safetensors"))
    state = model.state_dict()
    for k, v in ref.items():
        assert torch.equal(state[k], v.to(torch.float16)), k
    report = model.sparsegpt_load_report
    assert len(report["layers"]) == 14 and report["dense"] == 14 and report["kernels"] == 0  # CPU: dense, and why
    assert all(r["kernel"] == "dense" and r["reason"] == "not on a CUDA device" for r in report["layers"])

    reference = AutoModelForCausalLM.from_pretrained(str(comp), dtype=torch.float16).eval()
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(3))
    (la, ga), (lb, gb) = _outputs(model, ids), _outputs(reference, ids)
    assert torch.equal(la, lb) and torch.equal(ga, gb)


def test_pipeline_and_gpt2_conv1d(tmp_path):
    from transformers import AutoModelForCausalLM, pipeline

    comp = tmp_path / "c"
    assert compress_tiny(save_tiny(tmp_path, "gpt2"), comp, "--pattern", "2:4", "--bits", "4") == 0
    s24 = sparse24.export(comp, tmp_path / "s24", dtype="float32")
    dn = dense.export(comp, tmp_path / "dense", dtype="float32")
    model = AutoModelForCausalLM.from_pretrained(str(s24))
    plain = AutoModelForCausalLM.from_pretrained(str(dn))
    assert type(model.transformer.h[0].mlp.c_fc).__name__ == "Sparse24Linear"  # Conv1D decoded as [out, in]
    torch.testing.assert_close(model.transformer.h[0].mlp.c_fc.weight, plain.transformer.h[0].mlp.c_fc.weight.t(),
                               rtol=0, atol=0)
    kw = dict(max_new_tokens=6, do_sample=False)
    a = pipeline("text-generation", model=str(s24))("hello there", **kw)[0]["generated_text"]
    b = pipeline("text-generation", model=str(dn))("hello there", **kw)[0]["generated_text"]
    assert a == b and a.startswith("hello there")


@pytest.fixture
def s24(saved_tiny, tmp_path):
    comp = tmp_path / "c"
    assert compress_tiny(saved_tiny, comp, "--pattern", "2:4", "--bits", "4") == 0
    return sparse24.export(comp, tmp_path / "s24")


def test_bad_checkpoints_fail_before_anything_loads(s24):
    from transformers import AutoModelForCausalLM

    f = s24 / sparse24.WEIGHTS_FILE
    good, cfg = f.read_bytes(), (s24 / "config.json").read_text()

    def fails(match):
        with pytest.raises(ValueError, match=match):
            AutoModelForCausalLM.from_pretrained(str(s24))

    f.write_bytes(good[: len(good) // 2])
    fails("truncated or corrupt")
    f.write_bytes(good)
    t = load_file(str(f))
    t.pop(f"{LAYER}.positions")
    save_file(t, str(f), metadata={"format": "pt"})
    fails(rf"tensor {LAYER}.positions of layer {LAYER} is missing")
    f.write_bytes(good)
    c = json.loads(cfg)
    c["quantization_config"]["layers"][LAYER]["shape"] = [128, 32]
    (s24 / "config.json").write_text(json.dumps(c))
    fails(rf"layer {LAYER}: .*expected")
    c = json.loads(cfg)
    c["quantization_config"]["format_version"] = 99
    (s24 / "config.json").write_text(json.dumps(c))
    fails("format_version 99 is not supported")
    (s24 / "config.json").write_text(cfg)
    # tampered bytes (a code changed): the recorded SHA-256 no longer matches
    t = load_file(str(f))
    t[f"{LAYER}.codes"][0, 0] ^= 0x11
    save_file(t, str(f), metadata={"format": "pt", "format_version": "1"})
    fails("SHA-256 differs")
    # without the digest, tampered positions (a slot index repeated) are caught when the layer is decoded
    t = load_file(str(f))
    t[f"{LAYER}.positions"][0, 0] = 0
    save_file(t, str(f), metadata={"format": "pt", "format_version": "1"})
    c = json.loads(cfg)
    del c["quantization_config"]["sha256"]
    (s24 / "config.json").write_text(json.dumps(c))
    fails(rf"layer {LAYER}: positions are not ascending")
    f.write_bytes(good)
    (s24 / "config.json").write_text(cfg)
    assert AutoModelForCausalLM.from_pretrained(str(s24)) is not None


def test_static_cache_generate_and_compileable(s24):
    """The recipe of the README (``cache_implementation="static"``; compiled on a GPU) runs, eager here, and gives
    the same tokens as the dynamic cache."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(s24))
    assert model.hf_quantizer.is_compileable
    ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(4))
    kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    static = model.generate(ids, cache_implementation="static", **kw)
    assert torch.equal(static, model.generate(ids, **kw)) and static.shape == (2, 14)
