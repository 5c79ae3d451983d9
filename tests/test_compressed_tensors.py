"""compressed-tensors W4A16 export: loads in plain transformers with the exact compressed weights."""
import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import compress_tiny
from sparsegpt_export.cli import main
from sparsegpt_export.converters import compressed_tensors as ct


def _compress(saved, out, *extra):
    return compress_tiny(saved, out, "--pattern", "2:4", *extra)


@pytest.mark.parametrize("group,written", [("32", 32), ("48", 16), ("-1", None)])  # 48: 64/128 cols -> gcd 16
def test_round_trip_exact_in_transformers(saved_tiny, tmp_path, group, written):
    from transformers import AutoModelForCausalLM

    comp = tmp_path / "c"
    assert _compress(saved_tiny, comp, "--bits", "4", "--group-size", group) == 0
    assert main(["export", str(comp), "--format", "compressed-tensors", "--out", str(tmp_path / "ct")]) == 0
    out = tmp_path / "ct"
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    assert qc["sparsity_config"] == {}
    w = qc["config_groups"]["group_0"]["weights"]
    assert w["num_bits"] == 4 and w["symmetric"] and w.get("group_size") == written
    side = json.loads((out / ct.SPARSITY_FILE).read_text())
    assert side["pattern"] == "2:4" and abs(side["sparsity"] - 0.5) < 1e-6 and len(side["layers"]) == 14
    assert 0.5 <= side["zero_fraction"] < 0.55
    stored = load_file(str(out / "model.safetensors"))
    assert stored["model.layers.0.mlp.up_proj.weight_packed"].dtype == torch.int32
    assert "model.layers.0.mlp.up_proj.weight" not in stored

    model = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    reference = AutoModelForCausalLM.from_pretrained(str(comp), dtype=torch.float16).eval()
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a, b = model(ids).logits, reference(ids).logits  # the first forward decompresses
        kw = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
        assert torch.equal(model.generate(ids[:1], **kw), reference.generate(ids[:1], **kw))
    assert torch.equal(a, b)
    ref = load_file(str(comp / "model.safetensors"))
    state = model.state_dict()
    for k, v in ref.items():
        assert torch.equal(state[k], v.to(torch.float16)), k


def test_refusals_name_the_reason(saved_tiny, tmp_path, capsys):
    asym, fp = tmp_path / "asym", tmp_path / "fp"
    assert _compress(saved_tiny, asym, "--bits", "4", "--asym", "--group-size", "32") == 0
    assert _compress(saved_tiny, fp, "--bits", "none") == 0
    with pytest.raises(ValueError, match="asymmetric grid.*compress with --sym"):
        ct.export(asym, tmp_path / "o1")
    with pytest.raises(ValueError, match="no 4-bit layers"):
        ct.export(fp, tmp_path / "o2")
    sym = tmp_path / "sym"
    assert _compress(saved_tiny, sym, "--bits", "4", "--group-size", "32") == 0
    with pytest.raises(ValueError, match="float16 scales would be rounded to bfloat16"):
        ct.export(sym, tmp_path / "o3", dtype="bfloat16")
    assert main(["export", str(asym), "--format", "compressed-tensors", "--out", str(tmp_path / "o4")]) == 2
    assert "asymmetric" in capsys.readouterr().err
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 5))
