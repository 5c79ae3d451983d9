import pytest
import torch

from conftest import nm_holds
from sparsegpt_export.quant import QuantSpec, fit_params
from sparsegpt_export.solver import (HessianAccumulator, SolverError, expand_groups, magnitude_prune,
                                     sparsegpt_solve)


def _layer(rows=32, cols=128, tokens=512, seed=0, corr=True):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(tokens, cols, generator=g)
    if corr:  # correlated inputs with uneven channel scales, as in real activations
        X = X @ (torch.eye(cols) + 0.3 * torch.randn(cols, cols, generator=g) / cols**0.5)
        X = X * torch.exp(torch.randn(cols, generator=g))
    W = torch.randn(rows, cols, generator=g)
    acc = HessianAccumulator(cols)
    for chunk in X.split(100):
        acc.add(chunk)
    return W, X, acc.H


def _err(W, Wq, X):
    return ((X @ W.t() - X @ Wq.t()).pow(2).sum() / (X @ W.t()).pow(2).sum()).item()


def test_hessian_running_mean_matches_batch():
    W, X, H = _layer(tokens=700, cols=600)
    torch.testing.assert_close(H, 2 * X.t() @ X / X.shape[0], rtol=1e-4, atol=1e-3)
    assert torch.equal(H, H.t())


def test_nan_inputs_name_the_layer():
    acc = HessianAccumulator(8, name="model.layers.3.mlp.up_proj")
    x = torch.randn(4, 8)
    x[1, 2] = float("nan")
    with pytest.raises(SolverError, match="model.layers.3.mlp.up_proj"):
        acc.add(x)
        acc.H


@pytest.mark.parametrize("cols", [64, 600])  # 600: the CPU's block-triangle product
def test_hessian_is_the_same_however_the_windows_are_split(cols):
    """Issue #28: one process, chunks of any size and ranks must form the same Hessian, to the last bit (the running
    float32 mean this replaced rounded differently for every split, and the sweep amplified that into other masks).
    12 windows of 40 tokens in groups of 3; ranks start their shares at a group and add their float64 sums."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(12, 40, cols, generator=g) * torch.exp(torch.randn(cols, generator=g))
    one = HessianAccumulator(cols, group=3)
    one.add(X, 12)
    for splits in ([5, 2, 5], [1] * 12, [7, 5]):
        acc = HessianAccumulator(cols, group=3)
        for part in X.split(splits):
            acc.add(part, part.shape[0])
        assert torch.equal(acc.H, one.H), splits
    ranks = [HessianAccumulator(cols, group=3) for _ in range(2)]
    ranks[0].add(X[:6], 6)
    ranks[1].add(X[6:], 6)
    total = ranks[0].total()[0] + ranks[1].total()[0]
    assert torch.equal(ranks[0].normalized(total, 480), one.H)
    torch.testing.assert_close(one.H.double(), 2 * X.reshape(-1, cols).double().t() @ X.reshape(-1, cols).double() / 480,
                               rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4), (2, 8)])
def test_nm_pattern_exact(n, m):
    W, X, H = _layer()
    r = sparsegpt_solve(W, H, n=n, m=m)
    assert nm_holds(r.weight, n, m)
    # exactly m - n pruned per group in the mask, and pruned weights are exactly zero
    assert bool((r.mask.reshape(W.shape[0], -1, m).sum(-1) == m - n).all())
    assert bool((r.weight[r.mask] == 0).all())


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.7])
def test_unstructured_ratio_exact(sparsity):
    W, X, H = _layer(rows=30, cols=200)
    r = sparsegpt_solve(W, H, sparsity=sparsity, mask_blocksize=64)
    assert int(r.mask.sum()) == round(sparsity * W.numel())


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group", [32, 128, None])
def test_kept_weights_on_grid_and_zeros_stay_zero(sym, group):
    W, X, H = _layer(rows=24, cols=576 if group == 128 else 192)  # 576 = 4.5 x 128: narrower last group
    spec = QuantSpec(4, group, sym)
    r = sparsegpt_solve(W, H, n=2, m=4, quant=spec)
    assert nm_holds(r.weight, 2, 4)
    scale, zero = expand_groups(r.scales, r.zeros, W.shape[1], group)
    codes = r.weight / scale + zero
    assert torch.allclose(codes, codes.round(), atol=1e-4)
    assert float(codes.min()) >= -1e-4 and float(codes.max()) <= 15 + 1e-4
    assert bool((r.weight[r.mask] == 0).all())
    # scales are exactly representable in their storage dtype (float16)
    assert torch.equal(r.scales, r.scales.half().float())
    # the narrow last group has its own scale
    assert r.scales.shape[1] == spec.ngroups(W.shape[1])
    if sym:
        assert bool((r.zeros == 8).all())


def test_sparsity_zero_no_quant_is_identity():
    W, X, H = _layer()
    r = sparsegpt_solve(W, H, sparsity=0.0, quant=None)
    assert torch.equal(r.weight, W)


def test_sparsegpt_beats_magnitude():
    W, X, H = _layer(rows=64, cols=256, tokens=2048)
    for kw in ({"n": 2, "m": 4}, {"sparsity": 0.5}):
        r = sparsegpt_solve(W, H, **kw)
        assert _err(W, r.weight, X) < 0.8 * _err(W, magnitude_prune(W, **kw), X)
        # the reported error is the same quantity computed from the Hessian
        assert r.rel_error == pytest.approx(_err(W, r.weight, X), rel=1e-3)


def test_grid_fitted_to_kept_weights_ignores_pruned_outliers():
    w = torch.tensor([[0.1, -0.2, 0.15, 5.0]])
    keep = torch.tensor([[True, True, True, False]])
    spec = QuantSpec(4, None, True, clip_search=False)
    s_all, _ = fit_params(w, spec)
    s_kept, _ = fit_params(w, spec, keep)
    assert float(s_kept) < float(s_all) / 10


def test_clip_search_never_worse_than_minmax_on_kept():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(16, 128, generator=g)
    keep = torch.rand(16, 128, generator=g) > 0.5
    for sym in (True, False):
        errs = []
        for clip in (False, True):
            spec = QuantSpec(4, 128, sym, clip_search=clip)
            s, z = fit_params(w, spec, keep)
            q = (torch.clamp(torch.round(w / s) + z, 0, 15) - z) * s
            errs.append(((q - w) ** 2 * keep).sum().item())
        assert errs[1] <= errs[0] + 1e-6


def test_deterministic():
    W, X, H = _layer()
    a = sparsegpt_solve(W, H, n=2, m=4, quant=QuantSpec(4, 32))
    b = sparsegpt_solve(W, H, n=2, m=4, quant=QuantSpec(4, 32))
    assert torch.equal(a.weight, b.weight)


def test_damping_escalates_and_is_reported():
    W, X, H = _layer(cols=64)
    H = H.clone()
    H[0, 0] = -0.05 * torch.diag(H).mean()  # indefinite: damp 0.01 cannot fix it
    r = sparsegpt_solve(W[:, :64], H, n=2, m=4)
    assert r.damp_escalations >= 1 and r.damp > 0.01
    assert nm_holds(r.weight, 2, 4)


def test_dead_inputs():
    W, X, H = _layer(cols=64)
    H = H.clone()
    H[5, :] = 0
    H[:, 5] = 0
    r = sparsegpt_solve(W[:, :64], H, n=2, m=4)
    assert r.dead_inputs == 1
    assert torch.isfinite(r.weight).all()
    assert float(r.weight[:, 5].abs().max()) == 0.0


def test_columns_not_multiple_of_m():
    W, X, H = _layer(cols=130)
    with pytest.raises(SolverError, match="not a multiple of M=4"):
        sparsegpt_solve(W, H, n=2, m=4, name="x.proj")


@pytest.mark.parametrize("sym", [True, False])
def test_refit_scales_keeps_codes_and_mask_and_never_raises_error(sym):
    W, X, H = _layer(rows=48, cols=384, tokens=1024)
    spec = QuantSpec(4, 128, sym)
    a = sparsegpt_solve(W, H, n=2, m=4, quant=spec, refit_scales=False)
    b = sparsegpt_solve(W, H, n=2, m=4, quant=spec, refit_scales=True)
    assert torch.equal(a.mask, b.mask)
    assert torch.equal(a.codes(spec), b.codes(spec))
    assert b.rel_error <= a.rel_error
    assert not torch.equal(a.scales, b.scales)  # the refit moved some scales
    assert torch.equal(b.scales, b.scales.half().float())
    scale, zero = expand_groups(b.scales, b.zeros, W.shape[1], 128)
    assert torch.equal(b.weight, scale * (b.codes(spec).float() - zero))


def _plain_nm_sweep(W, H, n, m, blocksize=128):
    """SparseGPT's N:M sweep written out as the paper gives it, column by column (no quantization): the reference for
    the sweep's leaner form. Each OBS update is one product and one difference, each rounded, as the sweep does."""
    from sparsegpt_export.solver.obs import _inverse_cholesky
    U = _inverse_cholesky(H, 0.01, "")[0]
    W = W.clone().float()
    rows, cols = W.shape
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1, U1, Err = W[:, i1:i2].clone(), U[i1:i2, i1:i2], torch.zeros(rows, i2 - i1)
        d = torch.diag(U1)
        for i in range(i2 - i1):
            if i % m == 0:
                cost = W1[:, i:i + m] ** 2 / d[i:i + m].reshape(1, -1) ** 2
                mask[:, i1 + i:i1 + i + m].scatter_(1, torch.topk(cost, m - n, dim=1, largest=False).indices, True)
            w = W1[:, i].clone()
            q = w.masked_fill(mask[:, i1 + i], 0.0)
            err = (w - q) / d[i]
            W1[:, i + 1:] -= err[:, None] * U1[i, i + 1:][None, :]
            W1[:, i], Err[:, i] = q, err
        W[:, i1:i2] = W1
        W[:, i2:] -= Err.matmul(U[i1:i2, i2:])
    return W, mask


@pytest.mark.parametrize("threads", ["script", "script-3-threads", "python"])
def test_sweep_is_the_plain_algorithm_to_the_bit(monkeypatch, threads):
    """The sweep's lean form (the block transposed, the column steps as TorchScript, or in Python; the rows in slices
    on threads) gives what the column-by-column algorithm gives, bit for bit."""
    from sparsegpt_export.solver import LayerTask, SolveOptions, columns, solve_layer, update
    if threads == "python":
        monkeypatch.setattr(columns, "_SCRIPTED", [None])
    elif columns.scripted() is None:
        pytest.skip("TorchScript is not available in this PyTorch")
    monkeypatch.setattr(update, "SLICE_ROWS", 8)
    W, X, H = _layer(rows=50, cols=320, tokens=700)
    ref_w, ref_mask = _plain_nm_sweep(W, H, 2, 4)
    opts = SolveOptions(update="obs", workers=3 if threads == "script-3-threads" else 1)
    res, extra = solve_layer(W, H, LayerTask(prune=True, n=2, m=4), opts, measure=False)
    assert extra.get("row_slices", 1) == (3 if threads == "script-3-threads" else 1)
    assert torch.equal(res.mask, ref_mask)
    assert torch.equal(res.weight, ref_w)


def test_quantizing_sweep_same_bits_on_threads_and_in_python(monkeypatch):
    """The sweep that quantizes on a fixed mask (after the mask sweep or ADMM) and the products after it (the scale
    refit, the layer error): the same weights, scales and error on 1 and 3 threads and slices, as TorchScript and in
    Python."""
    from sparsegpt_export.solver import LayerTask, SolveOptions, columns, obs, solve_layer, update
    monkeypatch.setattr(obs, "FIT_SLICE_ROWS", 16)
    monkeypatch.setattr(update, "SLICE_ROWS", 8)
    W, X, H = _layer(rows=70, cols=256, tokens=600)
    quant = QuantSpec(4, 64, sym=False)
    mask = sparsegpt_solve(W, H, n=2, m=4, measure=False).mask
    runs = [sparsegpt_solve(W, H, mask=mask, quant=quant, workers=w) for w in (1, 3)]
    runs.append(solve_layer(W, H, LayerTask(prune=True, n=2, m=4), SolveOptions(quant=quant, workers=3))[0])
    runs.append(solve_layer(W, H, LayerTask(prune=True, n=2, m=4), SolveOptions(quant=quant, workers=1))[0])
    monkeypatch.setattr(columns, "_SCRIPTED", [None])
    runs.append(sparsegpt_solve(W, H, mask=mask, quant=quant))
    for r in (runs[1], runs[4]):
        assert torch.equal(r.weight, runs[0].weight) and torch.equal(r.scales, runs[0].scales)
        assert torch.equal(r.zeros, runs[0].zeros) and torch.equal(r.mask, mask)
        assert r.rel_error == runs[0].rel_error > 0
    assert torch.equal(runs[2].weight, runs[3].weight) and torch.equal(runs[2].scales, runs[3].scales)
    assert runs[2].rel_error == runs[3].rel_error > 0
