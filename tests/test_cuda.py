"""GPU: a sparse24 export loads onto PyTorch's semi-structured 2:4 kernels (skipped without CUDA)."""
import pytest
import torch

import sparsegpt_export  # noqa: F401
from conftest import compress_tiny
from sparsegpt_export.converters import sparse24

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU with 2:4 sparse tensor cores")]


@pytest.mark.parametrize("bits", ["4", "none"])
def test_sparse24_loads_on_semi_structured_kernels(saved_tiny, tmp_path, bits):
    from torch.sparse import SparseSemiStructuredTensor
    from transformers import AutoModelForCausalLM

    comp = tmp_path / "c"
    assert compress_tiny(saved_tiny, comp, "--pattern", "2:4", "--bits", bits) == 0
    s24 = sparse24.export(comp, tmp_path / "s24")
    model = AutoModelForCausalLM.from_pretrained(str(s24), device_map="cuda")
    report = model.sparsegpt_load_report
    sparse = [r["layer"] for r in report["layers"] if r["kernel"] != "dense"]
    assert sparse, report
    for name in sparse:
        assert isinstance(model.get_submodule(name).weight, SparseSemiStructuredTensor), name
    reference = sparse24.load_model(s24).to("cuda")
    ids = torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(0)).to("cuda")
    with torch.no_grad():
        a, b = model(ids).logits.float(), reference(ids).logits.float()
    torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)
