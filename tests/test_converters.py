"""Converters: dense and sparse24 exports of compress outputs (round trips, sizes, bad inputs, CLI)."""
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import compress_tiny, save_tiny
from sparsegpt_export.cli import main
from sparsegpt_export.converters import dense, sparse24
from sparsegpt_export.records import LayerRecord
from sparsegpt_export.io import load_records

CASES = {
    "2:4-int4": ("--pattern", "2:4", "--bits", "4"),
    "2:4-int4-asym": ("--pattern", "2:4", "--bits", "4", "--asym"),
    "4:8-fp": ("--pattern", "4:8", "--bits", "none"),
    "unstructured-fp": ("--pattern", "unstructured", "--bits", "none"),
}
LAYER = "model.layers.1.mlp.up_proj"


def _packed_bytes(folder):
    """Bytes of the packed layer tensors (codes, positions, scales, zeros) in a sparse24 export."""
    with safe_open(str(folder / sparse24.WEIGHTS_FILE), framework="pt") as f:
        return sum(f.get_tensor(k).nbytes for k in f.keys()
                   if k.rsplit(".", 1)[1] in ("codes", "positions", "scales", "zeros"))


def _same_model_outputs(reference, model):
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=0, atol=1e-5)
        kw = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
        assert torch.equal(model.generate(ids[:1], **kw), reference.generate(ids[:1], **kw))


@pytest.mark.parametrize("case", list(CASES))
def test_round_trip_is_bit_exact(saved_tiny, tmp_path, case):
    from transformers import AutoModelForCausalLM

    comp = tmp_path / "c"
    assert compress_tiny(saved_tiny, comp, *CASES[case]) == 0
    ref = load_file(str(comp / "model.safetensors"))
    s24 = sparse24.export(comp, tmp_path / "s24")
    dn = dense.export(comp, tmp_path / "dense")
    # the tiny model is float32, so both default to float16
    qc = json.loads((s24 / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "sparse24" and qc["format_version"] == 1 and qc["pattern"] == CASES[case][1]
    assert len(qc["layers"]) == 14 and json.loads((dn / "config.json").read_text())["dtype"] == "float16"
    for d in (s24, dn):
        for f in ("tokenizer.json", "sparsegpt_config.json", "sparsegpt_report.json", "generation_config.json"):
            assert (d / f).is_file(), (d, f)
    # the compressed layers are really stored packed, nothing dense left of them
    with safe_open(str(s24 / sparse24.WEIGHTS_FILE), framework="pt") as f:
        keys = set(f.keys())
    assert f"{LAYER}.weight" not in keys and (f"{LAYER}.values" in keys or f"{LAYER}.codes" in keys)

    sd = sparse24.load_state_dict(s24)
    plain = load_file(str(dn / "model.safetensors"))
    assert sd.keys() == ref.keys() == plain.keys()
    for k, v in ref.items():
        assert sd[k].dtype == plain[k].dtype == torch.float16, k
        assert torch.equal(sd[k], v.to(torch.float16)), k
        assert torch.equal(plain[k], v.to(torch.float16)), k

    reference = AutoModelForCausalLM.from_pretrained(str(comp)).to(torch.float16).float().eval()
    _same_model_outputs(reference, sparse24.load_model(s24).float())
    _same_model_outputs(reference, AutoModelForCausalLM.from_pretrained(str(dn)).float().eval())

    if CASES[case][3] == "4":
        measured, ideal = _packed_bytes(s24), sparse24.theoretical_bytes(load_records(comp))
        dense_fp16 = sum(r.shape[0] * r.shape[1] * 2 for r in load_records(comp).values())
        print(f"\n{case}: packed {measured} B, theoretical {ideal} B, dense float16 {dense_fp16} B, "
              f"file {(s24 / sparse24.WEIGHTS_FILE).stat().st_size} B vs {(dn / 'model.safetensors').stat().st_size} B")
        assert abs(measured - ideal) <= 0.05 * ideal
        assert measured < 0.25 * dense_fp16  # 2 of 4 kept: 4-bit codes + 2-bit positions + scales


def test_gpt2_conv1d_and_tied_weights(tmp_path):
    """Conv1D weights are stored [in, out]: packed as [out, in] and given back in the checkpoint's layout."""
    comp = tmp_path / "c"
    assert compress_tiny(save_tiny(tmp_path, "gpt2"), comp, "--pattern", "2:4", "--bits", "4") == 0
    s24 = sparse24.export(comp, tmp_path / "s24", dtype="float32")
    layers = json.loads((s24 / "config.json").read_text())["quantization_config"]["layers"]
    assert layers["transformer.h.0.attn.c_proj"]["transposed"] and layers["transformer.h.0.mlp.c_fc"]["shape"] == [256, 64]
    ref = load_file(str(comp / "model.safetensors"))
    sd = sparse24.load_state_dict(s24)
    assert "lm_head.weight" not in sd and sd.keys() == ref.keys()  # tied to wte: stored once
    assert all(torch.equal(sd[k], v) for k, v in ref.items())
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(str(comp)).eval()
    model = sparse24.load_model(s24)
    assert model.lm_head.weight is model.transformer.wte.weight
    _same_model_outputs(reference, model)


@pytest.mark.parametrize("pattern,bits,sym", [("2:4", 4, False), ("2:4", None, True), ("4:8", 3, True),
                                              ("unstructured", 4, True), ("unstructured", 2, False), ("dense", 8, False)])
def test_pack_layer_round_trip(pattern, bits, sym):
    """Synthetic layers, with groups of fewer than N nonzeros (kept zeros, empty groups) and a narrow last group."""
    g = torch.Generator().manual_seed(0)
    rows, cols, gs = 6, 40, 16
    ngroups = -(-cols // gs)
    scales = (torch.rand(rows, ngroups, generator=g) * 0.1 + 0.01).half() if bits else None
    zeros = torch.randint(0, 2**bits, (rows, ngroups), generator=g, dtype=torch.uint8) if bits and not sym else None
    if bits:
        z = zeros.float() if zeros is not None else torch.full((rows, ngroups), 2.0 ** (bits - 1))
        s, z = sparse24.expand_groups(scales.float(), z, cols, gs)
        w = s * (torch.randint(0, 2**bits, (rows, cols), generator=g).float() - z)
    else:
        w = torch.randn(rows, cols, generator=g)
    nm = sparse24.parse_nm(pattern)
    if nm:
        n, m = nm
        keep = torch.rand(rows, cols // m, m, generator=g).argsort(-1) < n
        w = w * keep.reshape(rows, cols).float()
        w[0, :m] = 0  # an empty group
        w[1, m:2 * m] = 0
        w[1, m + 1] = 1.0 if not bits else -s[1, m + 1] * z[1, m + 1] if z[1, m + 1] else s[1, m + 1]  # one nonzero
    elif pattern == "unstructured":
        w = w * (torch.rand(rows, cols, generator=g) < 0.4).float()
    rec = LayerRecord(name="x", shape=(rows, cols), pattern=pattern, sparsity=float((w == 0).float().mean()), bits=bits,
                      group_size=gs if bits else None, sym=sym, scales=scales, zeros=zeros)
    packed = sparse24.pack_layer("x", rec, w, torch.float32)
    meta = {"shape": [rows, cols], "pattern": pattern, "bits": bits, "group_size": rec.group_size, "sym": sym,
            "source_dtype": "float32", "scale_dtype": "float16", "nnz": int((w != 0).sum()), "layout": "packed"}
    assert set(packed) == set(sparse24.layer_tensor_specs(meta, torch.float32))

    def take(suffix):
        return sparse24.checked_tensor(packed.get(suffix), "x", suffix, meta, torch.float32, "test")

    assert torch.equal(sparse24.unpack_layer("x", meta, take), w)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cutlass_layout_round_trip(dtype):
    g = torch.Generator().manual_seed(1)
    rows, cols = 64, 128
    w = torch.randn(rows, cols, generator=g)
    keep = torch.rand(rows, cols // 4, 4, generator=g).argsort(-1) < 2
    w = (w * keep.reshape(rows, cols).float()).to(dtype)
    w[0, :4] = 0  # an empty group
    rec = LayerRecord(name="x", shape=(rows, cols), pattern="2:4", sparsity=0.5, bits=None, group_size=None, sym=True)
    packed = sparse24.pack_layer("x", rec, w, dtype)
    assert set(packed) == {"values", "meta"} and packed["meta"].dtype == torch.int16
    meta = {"shape": [rows, cols], "pattern": "2:4", "bits": None, "group_size": None, "sym": True, "layout": "cutlass"}
    assert torch.equal(sparse24.unpack_layer("x", meta, lambda sfx: packed[sfx]), w)
    # a CUTLASS tensor built from the stored values and metadata (what a CUDA load does) decodes to the same
    from torch.sparse._semi_structured_conversions import sparse_semi_structured_to_dense_cutlass
    assert torch.equal(sparse_semi_structured_to_dense_cutlass(packed["values"], packed["meta"]), w)


def test_bit_packing_layout():
    assert sparse24.pack_bits(torch.tensor([[1, 2, 15]]), 4).tolist() == [[0x21, 0x0F]]  # first code: low nibble
    assert sparse24.pack_bits(torch.tensor([[0, 1, 2, 3]]), 2).tolist() == [[0b11100100]]
    x = torch.randint(0, 8, (3, 11), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    assert sparse24.pack_bits(x, 3).shape == (3, 5)
    assert torch.equal(sparse24.unpack_bits(sparse24.pack_bits(x, 3), 3, 11), x)


@pytest.fixture
def compressed(saved_tiny, tmp_path):
    comp = tmp_path / "c"
    assert compress_tiny(saved_tiny, comp, "--pattern", "2:4", "--bits", "4") == 0
    return comp


def _rewrite(f, fn):
    t = load_file(str(f))
    fn(t)
    save_file(t, str(f), metadata={"format": "pt"})


def test_export_rejects_a_broken_pattern(compressed, tmp_path):
    scale = load_records(compressed)[LAYER].scales[0, 0].float()

    def tamper(t):
        t[f"{LAYER}.weight"][0, 20:24] = scale  # on the grid, but 4 nonzeros in group 5 of row 0

    _rewrite(compressed / "model.safetensors", tamper)
    with pytest.raises(ValueError, match=rf"layer {LAYER}: 4 nonzeros in a group of 4 at row 0, group 5; not 2:4"):
        sparse24.export(compressed, tmp_path / "s24")
    assert not (tmp_path / "s24").exists()


def test_export_rejects_weights_off_the_grid(compressed, tmp_path):
    def tamper(t):
        w = t[f"{LAYER}.weight"]
        r, c = (int(i) for i in w.ne(0).nonzero()[0])
        w[r, c] *= 1.01

    _rewrite(compressed / "model.safetensors", tamper)
    with pytest.raises(ValueError, match=rf"layer {LAYER}: .* not on its 4-bit grid"):
        sparse24.export(compressed, tmp_path / "s24")


def test_load_rejects_bad_files(compressed, tmp_path):
    s24 = sparse24.export(compressed, tmp_path / "s24")
    f = s24 / sparse24.WEIGHTS_FILE
    good, cfg = f.read_bytes(), (s24 / "config.json").read_text()
    # truncated
    f.write_bytes(good[: len(good) // 2])
    for load in (sparse24.load_state_dict, sparse24.load_model):
        with pytest.raises(ValueError, match=rf"{sparse24.WEIGHTS_FILE}.*truncated or corrupt"):
            load(s24)
    f.write_bytes(good)
    # a tensor missing
    _rewrite(f, lambda t: t.pop(f"{LAYER}.positions"))
    with pytest.raises(ValueError, match=rf"{LAYER}.positions of layer {LAYER} is missing"):
        sparse24.load_state_dict(s24)
    f.write_bytes(good)
    # a recorded shape that does not match the tensors
    c = json.loads(cfg)
    c["quantization_config"]["layers"][LAYER]["shape"] = [128, 128]
    (s24 / "config.json").write_text(json.dumps(c))
    with pytest.raises(ValueError, match=rf"layer {LAYER}: .* expected"):
        sparse24.load_state_dict(s24)
    # a newer format
    c = json.loads(cfg)
    c["quantization_config"]["format_version"] = 99
    (s24 / "config.json").write_text(json.dumps(c))
    with pytest.raises(ValueError, match="format_version 99"):
        sparse24.load_model(s24)
    (s24 / "config.json").write_text(cfg)
    # a changed code: well-formed, but the SHA-256 recorded at export no longer matches
    def flip(t):
        t[f"{LAYER}.codes"][0, 0] ^= 0x11

    _rewrite(f, flip)
    with pytest.raises(ValueError, match="SHA-256 differs"):
        sparse24.load_state_dict(s24)
    f.write_bytes(good)
    assert len(sparse24.load_state_dict(s24)) == len(load_file(str(compressed / "model.safetensors")))


def test_cli_export(compressed, tmp_path, capsys):
    out = tmp_path / "s24"
    assert main(["export", str(compressed), "--format", "sparse24", "--out", str(out)]) == 0
    assert "bytes written" in capsys.readouterr().out
    assert main(["export", str(compressed), "--format", "dense", "--out", str(tmp_path / "d"), "--dtype", "bfloat16"]) == 0
    ref = load_file(str(compressed / "model.safetensors"))
    plain = load_file(str(tmp_path / "d" / "model.safetensors"))
    assert all(torch.equal(plain[k], v.to(torch.bfloat16)) for k, v in ref.items())
    sd = sparse24.load_state_dict(out, dtype="bfloat16")
    assert all(torch.equal(sd[k], v.to(torch.float16).to(torch.bfloat16)) for k, v in ref.items())
    capsys.readouterr()
    assert main(["export", str(compressed), "--format", "bogus", "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "bogus" in err and "sparse24" in err and "Traceback" not in err and not (tmp_path / "b").exists()
    assert main(["export", str(compressed), "--format", "sparse24", "--out", str(out)]) == 2  # exists: --overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "nowhere"), "--format", "sparse24", "--out", str(tmp_path / "x")]) == 2
