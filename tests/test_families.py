"""Refusals before any work (one line naming the model type and why), and block-call capture."""
import pytest
import torch
from torch import nn

from conftest import VOCAB, byte_tokenizer
from sparsegpt_export import SparseGPTConfig, UnsupportedModelError, compress_model, families, moe


def tiny_mamba():
    from transformers import MambaConfig, MambaForCausalLM

    torch.manual_seed(0)
    return MambaForCausalLM(MambaConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, state_size=8)).eval()


def test_cli_refuses_a_state_space_model_with_one_line_and_writes_nothing(tmp_path, capsys):
    from safetensors.torch import save_file

    from sparsegpt_export.cli import main

    d = tmp_path / "tiny-mamba"
    tiny_mamba().save_pretrained(d)
    byte_tokenizer().save_pretrained(d)
    cal = tmp_path / "calib.safetensors"
    save_file({"input_ids": torch.randint(0, 256, (8, 32))}, str(cal))
    out = tmp_path / "out"
    capsys.readouterr()  # the setup's own output
    rc = main(["compress", str(d), "--dataset", str(cal), "--nsamples", "8", "--seqlen", "32", "--out", str(out),
               "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and "model type 'mamba'" in err[0] and "state-space" in err[0], err
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.safetensors", "tiny-mamba"]


def test_api_refuses_before_touching_the_model(calib):
    model = tiny_mamba()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UnsupportedModelError, match=r"model type 'mamba' \(MambaForCausalLM\): its blocks are pure"):
        compress_model(model, calib, SparseGPTConfig(pattern="2:4", bits=4, group_size=32), progress=False)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_blocks_without_linear_layers_are_refused():
    class NoLinears(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([nn.LayerNorm(8), nn.LayerNorm(8)])

    m = NoLinears()
    with pytest.raises(UnsupportedModelError, match="no linear layer"):
        families.check_blocks(m, m.layers)


def test_positional_block_arguments_become_keywords():
    class Block(nn.Module):
        def forward(self, hidden, mask, bias=None, **extra):
            return hidden

    h, mask, bias = torch.ones(1), torch.zeros(2), torch.ones(3)
    hs, kw = families.block_inputs(Block(), (h, mask), {"bias": bias, "flag": True})
    assert hs is h and kw == {"mask": mask, "bias": bias, "flag": True}


def test_moe_router_layers_stay_dense(calib):
    from transformers import AutoModelForCausalLM, Qwen2MoeConfig

    torch.manual_seed(0)
    cfg = Qwen2MoeConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=128, moe_intermediate_size=64,
                         shared_expert_intermediate_size=64, num_experts=4, num_experts_per_tok=2)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    routers = moe.routers(model.model.layers[0])
    assert routers == ["mlp.shared_expert_gate"]
    gate = model.model.layers[0].mlp.shared_expert_gate.weight.detach().clone()
    res = compress_model(model, calib[:4, :16], SparseGPTConfig(pattern="2:4", bits=4, group_size=32), progress=False)
    assert torch.equal(model.model.layers[0].mlp.shared_expert_gate.weight, gate)
    assert res.report["moe"]["routers_left_dense"] == [f"model.layers.{i}.mlp.shared_expert_gate" for i in range(2)]
    assert "model.layers.0.mlp.shared_expert.gate_proj" in res.records  # the shared expert is compressed


def test_alternating_layers_get_their_own_masks():
    """Gemma 3 alternates sliding-window and full attention: each block is calibrated with its own mask."""
    from transformers import AutoModelForCausalLM, Gemma3TextConfig

    from sparsegpt_export.anatomy import find_blocks
    from sparsegpt_export.pipeline import per_block as capture

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, intermediate_size=128, head_dim=16, sliding_window=4,
                           layer_types=["sliding_attention", "full_attention"])
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()  # explicit masks
    _, blocks = find_blocks(model)
    ids = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    per_block = capture.per_block_kwargs(model, blocks, ids, 2, torch.device("cpu"))
    assert len(per_block) == 2 and all(len(r) == 2 for r in per_block)  # 2 chunks x 2 blocks
    seen = {}
    for i in range(2):
        hook = blocks[i].register_forward_pre_hook(
            lambda _m, a, kw, i=i: seen.__setitem__(i, kw["attention_mask"]), with_kwargs=True)
    with torch.no_grad():
        model(ids[:2], use_cache=False)
    for i in range(2):  # what the model itself hands each block
        assert torch.equal(per_block[0][i]["attention_mask"], seen[i]), i
    assert not torch.equal(seen[0], seen[1])  # sliding window of 4 against full causal
    from conftest import make_model

    llama = make_model("llama")  # one kind of layer: the first block's arguments serve all
    assert capture.per_block_kwargs(llama, llama.model.layers, ids, 2, torch.device("cpu")) is None
