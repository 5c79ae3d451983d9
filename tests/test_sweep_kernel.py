"""The column sweep's lazy block as one Triton kernel (`sparsegpt_export.solver.sweep_kernel`): the same result as
the torch sweep (`solver.columns`). Without a GPU the kernel runs on CPU tensors in triton's interpreter
(``TRITON_INTERPRET=1``), where both do the same float32 operations, so the results are compared bit for bit; on a
GPU the same cases run in tests/test_cuda.py, within float32 rounding."""
import os
import sys

import pytest
import torch
from conftest import old_interpreter

if not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported

from sparsegpt_export.kernels import ops  # noqa: E402
from sparsegpt_export.quant import QuantSpec  # noqa: E402
from sparsegpt_export.solver import LayerTask, SolveOptions, SolverError, obs, solve_layer, sparsegpt_solve  # noqa: E402

needs_interpreter = pytest.mark.skipif(
    not ops.triton_available() or os.environ.get("TRITON_INTERPRET") != "1" or old_interpreter() is not None,
    reason=old_interpreter()
    or "needs triton (pip install '.[gpu]') and TRITON_INTERPRET=1 set before triton is imported")


def _layer(rows=24, cols=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(1024, cols, generator=g) * torch.exp(torch.randn(cols, generator=g))
    return torch.randn(rows, cols, generator=g), 2 * X.t() @ X / X.shape[0]


def _kernel_blocks(monkeypatch) -> list:
    """Record the blocks the kernel walks."""
    calls, real = [], obs._Sweep.block_kernel

    def spy(self, i1, i2):
        calls.append((i1, i2))
        return real(self, i1, i2)
    monkeypatch.setattr(obs._Sweep, "block_kernel", spy)
    return calls


CASES = {
    "2:4": dict(n=2, m=4),
    "4:8": dict(n=4, m=8),
    "unstructured": dict(sparsity=0.5),
    "w4 per channel": dict(sparsity=0.0, quant=QuantSpec(4, None)),
    "unstructured w4 g128": dict(sparsity=0.5, quant=QuantSpec(4, 128)),
}


@needs_interpreter
@pytest.mark.parametrize("case", list(CASES))
def test_kernel_sweep_is_the_torch_sweep_to_the_bit(monkeypatch, case):
    W, H = _layer(rows=21)  # a partial tile of rows
    a = sparsegpt_solve(W, H, sweep="torch", **CASES[case])
    calls = _kernel_blocks(monkeypatch)
    b = sparsegpt_solve(W, H, sweep="triton", **CASES[case])
    assert calls == [(0, 128), (128, 256)]
    assert torch.equal(a.weight, b.weight) and torch.equal(a.mask, b.mask)
    assert a.rel_error == b.rel_error > 0
    if a.scales is not None:
        assert torch.equal(a.scales, b.scales) and torch.equal(a.zeros, b.zeros)


@needs_interpreter
@pytest.mark.parametrize("quant", [QuantSpec(4, 128), QuantSpec(4, 64, sym=False), QuantSpec(3, None)])
def test_kernel_quantizes_on_a_fixed_mask_as_torch(monkeypatch, quant):
    """The second sweep of the default ``after-mask`` order (and the one after ADMM): a fixed mask, a grid per group;
    a group narrower than the block makes the kernel's blocks the group."""
    W, H = _layer(rows=18)
    mask = sparsegpt_solve(W, H, n=2, m=4, sweep="torch").mask
    a = sparsegpt_solve(W, H, mask=mask, quant=quant, sweep="torch")
    calls = _kernel_blocks(monkeypatch)
    b = sparsegpt_solve(W, H, mask=mask, quant=quant, sweep="triton")
    assert calls == ([(0, 64), (64, 128), (128, 192), (192, 256)] if quant.group_size == 64 else [(0, 128), (128, 256)])
    assert torch.equal(a.weight, b.weight) and torch.equal(a.scales, b.scales) and torch.equal(a.zeros, b.zeros)
    assert torch.equal(b.mask, mask)


@needs_interpreter
def test_kernel_joint_nm_choice_with_the_grid(monkeypatch):
    """N:M chosen while quantizing (``quant_order="joint"``): the saliency counts the quantization error. The weights
    and scales are torch's; the masks differ only where saliencies tie (weights that quantize to 0 either way: the
    kernel drops the lower column, ``torch.topk`` its own choice)."""
    W, H = _layer(rows=20)
    quant = QuantSpec(4, 128)
    a = sparsegpt_solve(W, H, n=2, m=4, quant=quant, sweep="torch")
    calls = _kernel_blocks(monkeypatch)
    b = sparsegpt_solve(W, H, n=2, m=4, quant=quant, sweep="triton")
    assert len(calls) == 2
    assert torch.equal(a.weight, b.weight) and torch.equal(a.scales, b.scales)
    differ = a.mask != b.mask
    assert not a.weight[differ].any()
    assert (b.mask.reshape(20, -1, 4).sum(-1) >= 2).all()  # still at least 2 of 4 pruned


@needs_interpreter
def test_solve_layer_after_mask_default_on_the_kernel(monkeypatch):
    """The default solve (mask sweep, then quantized on the mask, then the refit) through `solve_layer`."""
    W, H = _layer(rows=16)
    task = LayerTask(prune=True, n=2, m=4)
    a, _ = solve_layer(W, H, task, SolveOptions(quant=QuantSpec(4, 128), sweep="torch"))
    calls = _kernel_blocks(monkeypatch)
    b, _ = solve_layer(W, H, task, SolveOptions(quant=QuantSpec(4, 128), sweep="triton"))
    assert len(calls) == 4  # two sweeps of two blocks
    assert torch.equal(a.weight, b.weight) and torch.equal(a.mask, b.mask) and torch.equal(a.scales, b.scales)
    assert a.rel_error == b.rel_error


def test_kernel_skips_blocks_it_does_not_take(monkeypatch):
    """ISC saliency (a diagonal term the kernel does not have) and float64 stay on the torch sweep, whatever
    ``sweep`` says; on the CPU ``auto`` is torch."""
    W, H = _layer(rows=8, cols=128)
    sweep = obs._Sweep.start(W, H, None, 0.01, "isc", None, "x")
    assert not sweep.kernel_fits(0, 128)
    sweep64 = obs._Sweep.start(W, H.double(), None, 0.01, "obs", None, "x")
    assert not sweep64.kernel_fits(0, 128)
    assert not obs.kernel_sweep("auto", torch.device("cpu"))
    assert not obs.kernel_sweep("torch", torch.device("cuda"))


def test_bad_sweep_names_the_layer(monkeypatch):
    W, H = _layer(rows=8, cols=128)
    with pytest.raises(SolverError, match=r"layer model.layers.0.mlp: sweep 'fast' is not one of"):
        sparsegpt_solve(W, H, n=2, m=4, sweep="fast", name="model.layers.0.mlp")
    if ops.triton_available():
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(SolverError, match=r"layer q: sweep 'triton' runs on a CUDA device, or on CPU tensors"):
            sparsegpt_solve(W, H, n=2, m=4, sweep="triton", name="q")


@needs_interpreter
def test_compress_on_the_kernel_is_compress_on_torch(saved_tiny, tmp_path):
    """The whole CLI run (2:4 + 4-bit, the default ADMM update, whose last sweep quantizes on the mask) with every
    block's sweep on the kernel: the same export as torch's sweep, tensor for tensor."""
    from safetensors.torch import load_file

    from conftest import compress_tiny

    for sweep in ("torch", "triton"):
        assert compress_tiny(saved_tiny, tmp_path / sweep, "--pattern", "2:4", "--bits", "4", "--update", "obs",
                             "--sweep", sweep, "--device", "cpu") == 0
    a, b = (load_file(str(tmp_path / s / "model.safetensors")) for s in ("torch", "triton"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_cli_refuses_a_sweep_the_device_cannot_run(saved_tiny, tmp_path, monkeypatch, capsys):
    from conftest import compress_tiny

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    rc = compress_tiny(saved_tiny, tmp_path / "o", "--sweep", "triton", "--device", "cpu")
    assert rc == 2
    err = capsys.readouterr().err
    assert "sweep 'triton'" in err and ("CUDA device" in err or "needs triton" in err)
    assert not (tmp_path / "o").exists()
