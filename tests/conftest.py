"""Tiny random models of the supported architectures, a byte-level tokenizer, and the shared data folder."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("SPARSEGPT_DATA", ROOT.parent / "shared" / "data"))
VOCAB = 272


def old_interpreter() -> str | None:
    """Why triton's interpreter cannot run the kernels here, or None. Before triton 3.7 it turns a scalar argument
    into a Python int with ``int()`` of a one-element array, which numpy 2.4 refuses (TypeError inside every kernel
    with a loop over a runtime bound). Read from the installed versions, without importing triton (the kernel tests
    set ``TRITON_INTERPRET`` before its first import)."""
    from importlib.metadata import PackageNotFoundError, version

    from packaging.version import Version

    try:
        triton_v, numpy_v = version("triton"), version("numpy")
    except PackageNotFoundError:
        return None
    if Version(triton_v).release < (3, 7) and Version(numpy_v).release >= (2, 4):
        return (f"triton {triton_v}'s interpreter cannot run the kernels with numpy {numpy_v} (int() of a one-element "
                "array; fixed in triton 3.7): pip install 'triton>=3.7'")
    return None


def _configs():
    from transformers import (FalconConfig, GPT2Config, GPTNeoXConfig, GemmaConfig, LlamaConfig, MistralConfig,
                              OPTConfig, Phi3Config, Qwen2Config, Qwen3Config)

    common = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4)
    return {
        "llama": LlamaConfig(**common, intermediate_size=128, num_key_value_heads=2),
        "mistral": MistralConfig(**common, intermediate_size=128, num_key_value_heads=2, sliding_window=None),
        "qwen2": Qwen2Config(**common, intermediate_size=128, num_key_value_heads=2),
        "qwen3": Qwen3Config(**common, intermediate_size=128, num_key_value_heads=2, head_dim=16),
        "phi3": Phi3Config(**common, intermediate_size=128, num_key_value_heads=4, pad_token_id=0),
        "gemma": GemmaConfig(**common, intermediate_size=128, num_key_value_heads=1, head_dim=16),
        "opt": OPTConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=128,
                         word_embed_proj_dim=64, max_position_embeddings=256),
        "gpt2": GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=256),
        "gpt_neox": GPTNeoXConfig(**common, intermediate_size=128),
        "falcon": FalconConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                               new_decoder_architecture=False, multi_query=True, parallel_attn=True, bias=False),
    }


ARCHS = ["llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "opt", "gpt2", "gpt_neox", "falcon"]


def make_model(arch: str = "llama", seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = _configs()[arch]
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager" if arch in ("opt", "gpt2") else "sdpa")
    return model.eval()


def byte_tokenizer():
    """A byte-level BPE tokenizer with no merges (256 byte tokens + specials); needs no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab["<|endoftext|>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


@pytest.fixture
def tiny_llama():
    return make_model("llama")


@pytest.fixture
def calib():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (8, 32), generator=g)


def save_tiny(root: Path, arch: str = "llama", model=None) -> tuple[Path, Path]:
    """A tiny checkpoint of ``arch`` (or ``model``) with a tokenizer in ``root/tiny-<arch>``, and a pre-tokenized
    calibration file ``root/calib.safetensors`` (8 x 32 tokens, seed 1): what ``compress_tiny`` takes."""
    from safetensors.torch import save_file

    d = root / f"tiny-{arch}"
    (model if model is not None else make_model(arch)).save_pretrained(d)
    byte_tokenizer().save_pretrained(d)
    cal = root / "calib.safetensors"
    save_file({"input_ids": torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(1))}, str(cal))
    return d, cal


@pytest.fixture
def saved_tiny(tmp_path):
    """A tiny Llama checkpoint with a tokenizer and a pre-tokenized calibration file on disk."""
    return save_tiny(tmp_path)


def compress_tiny(saved, out, *extra) -> int:
    """``sparsegpt-export compress`` of the ``saved_tiny`` checkpoint (8 x 32 tokens, groups of 32 unless
    ``extra`` says otherwise: later flags win). Returns the exit code."""
    from sparsegpt_export.cli import main

    d, cal = saved
    return main(["compress", str(d), "--dataset", str(cal), "--nsamples", "8", "--seqlen", "32", "--group-size", "32",
                 "--out", str(out), "--no-progress", *extra])


def nm_holds(w: torch.Tensor, n: int, m: int) -> bool:
    """At most n nonzeros in every m consecutive weights along the input dimension of w [out, in]."""
    return bool((w.reshape(w.shape[0], -1, m).ne(0).sum(-1) <= n).all())
