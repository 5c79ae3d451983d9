"""Block-wise reconstruction (``--reconstruct-steps``, issue #26): lower block output error on windows it never
saw, the mask and the quantization grid exact, resumable, deterministic, and clear errors for bad input."""
import pytest
import torch

from conftest import make_model, nm_holds
from sparsegpt_export.anatomy import get_weight
from sparsegpt_export.cli import main as cli_main
from sparsegpt_export.config import ConfigError, SparseGPTConfig
from sparsegpt_export.pipeline import compress_model, reconstruct
from sparsegpt_export.solver import expand_groups


def _cfg(**kw):
    return SparseGPTConfig(dataset=None, nsamples=16, seqlen=32, **kw)


def _windows(seed: int, n: int = 16) -> torch.Tensor:
    return torch.randint(0, 250, (n, 32), generator=torch.Generator().manual_seed(seed))


def _block0_error(dense, model, ids) -> float:
    """Relative error of block 0's outputs against the dense block's, on ``ids`` (block 0's inputs are the same
    embeddings in both models)."""
    outs = {}
    for key, m in (("dense", dense), ("model", model)):
        h = m.model.layers[0].register_forward_hook(lambda mod, a, o, key=key: outs.__setitem__(key, o[0] if isinstance(o, tuple) else o))
        with torch.no_grad():
            m(ids)
        h.remove()
    return float((outs["model"] - outs["dense"]).pow(2).sum() / outs["dense"].pow(2).sum())


@pytest.mark.parametrize("bits", [None, 4])
def test_reconstruction_lowers_held_out_error_and_keeps_mask_and_grid(bits):
    calib, held_out = _windows(0), _windows(1)
    dense = make_model("llama")
    kw = dict(pattern="2:4", bits=bits, group_size=16 if bits else None)
    plain = make_model("llama")
    compress_model(plain, calib, _cfg(**kw), progress=False)
    tuned = make_model("llama")
    res = compress_model(tuned, calib, _cfg(reconstruct_steps=60, reconstruct_batch=4, **kw), progress=False)
    assert _block0_error(dense, tuned, held_out) < _block0_error(dense, plain, held_out)
    blocks = res.report["reconstruction"]["blocks"]
    assert len(blocks) == 2 and all(b["error_after"] < b["error_before"] for b in blocks)
    for name, rec in res.records.items():
        W = get_weight(tuned.get_submodule(name)).float()
        assert nm_holds(W, 2, 4), name
        if name.startswith("model.layers.0."):  # same inputs as the untuned run: the same mask exactly
            W0 = get_weight(plain.get_submodule(name)).float()
            assert bool(((W != 0) <= (W0 != 0)).all()), name
        if bits:  # every weight a code of its group's stored scale
            scale, _ = expand_groups(rec.scales.float(), rec.scales.float(), W.shape[1], rec.group_size)
            codes = W / scale
            assert torch.equal(codes, torch.round(codes)), name
            assert codes.abs().max() <= 8, name
            assert torch.equal(rec.scales.float().to(rec.scales.dtype), rec.scales)


def test_reconstruction_is_deterministic_and_resumes_mid_run(tmp_path, monkeypatch):
    calib = _windows(0)
    cfg = _cfg(pattern="2:4", bits=4, group_size=16, reconstruct_steps=20, reconstruct_batch=4, seed=3)
    ref = make_model("llama")
    compress_model(ref, calib, cfg, progress=False)
    again = make_model("llama")
    compress_model(again, calib, cfg, progress=False)
    for (n, p1), p2 in zip(ref.named_parameters(), again.parameters()):
        assert torch.equal(p1, p2), n

    real = reconstruct.tune_block
    calls = []

    def interrupt_second_block(*a, **k):
        calls.append(1)
        if len(calls) == 2:  # in the middle of the run: block 0 tuned and checkpointed, block 1 being tuned
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(reconstruct, "tune_block", interrupt_second_block)
    ckpt = tmp_path / "ckpt"
    with pytest.raises(KeyboardInterrupt):
        compress_model(make_model("llama"), calib, cfg, progress=False, checkpoint_dir=ckpt)
    monkeypatch.setattr(reconstruct, "tune_block", real)
    fresh = make_model("llama")
    res = compress_model(fresh, calib, cfg, progress=False, checkpoint_dir=ckpt, resume=True)
    for (n, p1), p2 in zip(ref.named_parameters(), fresh.parameters()):
        assert torch.equal(p1, p2), n
    assert [b["block"] for b in res.report["reconstruction"]["blocks"]] == [1]


@pytest.mark.parametrize("kw,match", [
    (dict(reconstruct_steps=-1), "reconstruct_steps: -1 must be an integer >= 0"),
    (dict(reconstruct_steps=2, pattern="dense", bits=None), "pattern 'dense' without --bits"),
    (dict(reconstruct_steps=2, reconstruct_batch=0), "reconstruct_batch: 0"),
    (dict(reconstruct_steps=2, reconstruct_lr=0.0), "reconstruct_lr: 0.0 must be a positive number"),
])
def test_bad_reconstruction_options(kw, match):
    with pytest.raises(ConfigError, match=match):
        _cfg(**kw).validate()


def test_cli_refuses_a_negative_step_count_before_loading(capsys):
    assert cli_main(["compress", "no-such-model-dir", "--out", "x", "--reconstruct-steps", "-1"]) != 0
    err = capsys.readouterr().err
    assert "reconstruct_steps: -1" in err and "no-such-model-dir" not in err


class _NoBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 1.0

    @staticmethod
    def backward(ctx, g):
        raise RuntimeError("this block has no backward")


def test_a_block_that_cannot_run_backward_is_named():
    model = make_model("llama")
    mlp = model.model.layers[0].mlp
    forward = mlp.forward
    mlp.forward = lambda x: _NoBackward.apply(forward(x))
    with pytest.raises(ConfigError, match=r"block model\.layers\.0 \(LlamaDecoderLayer\) cannot run backward"):
        compress_model(model, _windows(0), _cfg(pattern="2:4", reconstruct_steps=2), progress=False)


def test_no_gradient_to_a_layer_is_named():
    model = make_model("llama")
    attn = model.model.layers[0].self_attn
    v_forward = attn.v_proj.forward
    attn.v_proj.forward = lambda x: v_forward(x).detach()
    with pytest.raises(ConfigError, match=r"no gradient reaches model\.layers\.0\.self_attn\.v_proj"):
        compress_model(model, _windows(0), _cfg(pattern="2:4", reconstruct_steps=2), progress=False)


def test_not_run_when_off():
    res = compress_model(make_model("llama"), _windows(0), _cfg(pattern="2:4"), progress=False)
    assert "reconstruction" not in res.report
