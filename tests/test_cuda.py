"""GPU: sparse24 exports load onto our 2:4 kernels (`sparsegpt_export.kernels`) and serve through ``generate``,
eager and compiled static-cache, at batch 1, 16 and 64 (skipped without CUDA). The kernels themselves run against
dense in tests/test_kernels.py, on CUDA tensors when a GPU is present."""
import pytest
import torch

import sparsegpt_export  # noqa: F401
from conftest import compress_tiny
from sparsegpt_export.converters import sparse24

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (sm80 or newer) and triton")]


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    from conftest import save_tiny

    root = tmp_path_factory.mktemp("cuda")
    saved = save_tiny(root)
    out = {}
    for bits in ("4", "none"):
        comp = root / f"c{bits}"
        assert compress_tiny(saved, comp, "--pattern", "2:4", "--bits", bits) == 0
        out[bits] = sparse24.export(comp, root / f"s24-{bits}", dtype="float16")
    return out


@pytest.mark.parametrize("bits", ["4", "none"])
def test_sparse24_loads_on_our_kernels(exports, bits):
    from transformers import AutoModelForCausalLM

    from sparsegpt_export.kernels import Sparse24Linear

    model = AutoModelForCausalLM.from_pretrained(str(exports[bits]), device_map="cuda")
    report = model.sparsegpt_load_report
    if torch.cuda.get_device_capability()[0] < 8:
        assert report["kernels"] == 0 and all("older than sm80" in r["reason"] for r in report["layers"])
        return
    assert report["kernels"] == len(report["layers"]) == 14, report
    for r in report["layers"]:
        layer = model.get_submodule(r["layer"])
        assert isinstance(layer, Sparse24Linear) and layer.kind == ("int4_24" if bits == "4" else "fp16_24"), r
        assert layer.codes.is_cuda if bits == "4" else layer.values.is_cuda
    reference = sparse24.load_model(exports[bits]).to("cuda")
    ids = torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(0)).to("cuda")
    with torch.no_grad():
        a, b = model(ids).logits.float(), reference(ids).logits.float()
    torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("bits", ["4", "none"])
@pytest.mark.parametrize("batch", [1, 16, 64])
@pytest.mark.parametrize("mode", ["eager", "compiled"])
def test_generate_eager_and_compiled(exports, bits, batch, mode):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(exports[bits]), device_map="cuda")
    reference = sparse24.load_model(exports[bits]).to("cuda")
    ids = torch.randint(0, 256, (batch, 8), generator=torch.Generator().manual_seed(batch)).to("cuda")
    kw = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
    if mode == "compiled":
        kw["cache_implementation"] = "static"
    out = model.generate(ids, **kw)
    assert out.shape == (batch, 16)
    assert hasattr(model, "_compiled_call") == (mode == "compiled")  # transformers compiled the decode step
    # every generated token is (within fp16 noise) the greedy choice of the dense decode of the same file, fed
    # the same sequence (teacher forcing: near-ties may pick either token, then the sequences differ)
    with torch.no_grad():
        logits = reference(out).logits.float()[:, 7:-1]
    chosen = logits.gather(-1, out[:, 8:, None]).squeeze(-1)
    assert bool((chosen >= logits.max(-1).values - 5e-2).all())


@pytest.mark.parametrize("quant", [False, True])
def test_sweep_kernel_matches_the_torch_sweep_on_the_gpu(quant):
    """The column sweep's block kernel (`solver.sweep_kernel`, what ``--sweep auto`` runs on CUDA) against torch's
    per-column sweep on CUDA tensors: masks the same but for near-ties, the layer error within float32 rounding."""
    from conftest import nm_holds
    from sparsegpt_export.quant import QuantSpec
    from sparsegpt_export.solver import LayerTask, SolveOptions, solve_layer

    g = torch.Generator().manual_seed(0)
    X = torch.randn(4096, 512, generator=g) * torch.exp(torch.randn(512, generator=g))
    H, W = (2 * X.t() @ X / X.shape[0]).cuda(), torch.randn(1024, 512, generator=g).cuda()
    opts = {"quant": QuantSpec(4, 128) if quant else None, "update": "obs"}
    task = LayerTask(prune=True, n=2, m=4)
    a, _ = solve_layer(W, H, task, SolveOptions(sweep="torch", **opts))
    b, _ = solve_layer(W, H, task, SolveOptions(sweep="triton", **opts))
    assert (a.mask == b.mask).float().mean().item() > 0.99
    assert abs(a.rel_error - b.rel_error) <= 1e-3 * a.rel_error
    assert nm_holds(b.weight.cpu(), 2, 4) and torch.isfinite(b.weight).all()
