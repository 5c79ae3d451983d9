"""ONNX export (MatMulNBits / QDQ / float) of tiny compressed models, and the ONNX Runtime runner."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import byte_tokenizer, compress_tiny, make_model, save_tiny

pytest.importorskip("onnxscript")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / a.abs().max())


def _session_with_level(path, level: int):
    """The graph with every MatMulNBits' accuracy_level set to ``level``, opened from memory."""
    from sparsegpt_export.converters.onnx import set_accuracy_level

    proto = onnx.load(str(path))
    assert set_accuracy_level(proto, level) == 8  # 2 layers x (q/k/v, o, gate/up, down)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _prefill_logits(session, ids: torch.Tensor, kv_heads: int, head_dim: int) -> torch.Tensor:
    feeds = {"input_ids": ids.numpy(), "attention_mask": np.ones(ids.shape, np.int64),
             "position_ids": np.broadcast_to(np.arange(ids.shape[1]), ids.shape).copy()}
    for i in session.get_inputs():
        if i.name.startswith("input.past_key_values"):
            feeds[i.name] = np.zeros((ids.shape[0], kv_heads, 0, head_dim), np.float32)
    return torch.from_numpy(session.run(["logits"], feeds)[0])


@pytest.fixture(scope="module")
def compressed(tmp_path_factory):
    """A tiny Llama compressed to 2:4 + 4-bit (symmetric, groups of 32) and its torch reference."""
    from transformers import AutoModelForCausalLM

    tmp = tmp_path_factory.mktemp("onnx")
    saved = save_tiny(tmp)
    assert compress_tiny(saved, tmp / "c") == 0
    ref = AutoModelForCausalLM.from_pretrained(tmp / "c").eval()
    return tmp, saved, ref


@pytest.fixture(scope="module")
def exported(compressed):
    """The CLI export with MatMulNBits at accuracy_level 0."""
    from sparsegpt_export.cli import main

    tmp, _, _ = compressed
    out = tmp / "onnx-nbits"
    assert main(["export", str(tmp / "c"), "--format", "onnx", "--accuracy-level", "0", "--out", str(out)]) == 0
    return out


def test_matmulnbits_graph_is_built_from_our_codes(compressed, exported):
    from safetensors.torch import load_file

    from sparsegpt_export.io import load_records

    tmp, _, _ = compressed
    proto = onnx.load(str(exported / "model.onnx"))
    nodes = [n for n in proto.graph.node if n.op_type == "MatMulNBits"]
    records = load_records(tmp / "c")
    # the gqa graph packs q/k/v and gate/up: 4 MatMulNBits per layer holding the rows of all 7 layers
    assert len(records) == 14 and len(nodes) == 8
    rows_of = lambda n: next(a.i for a in n.attribute if a.name == "N")  # noqa: E731
    assert sum(rows_of(n) for n in nodes) == sum(r.shape[0] for r in records.values())
    assert len(proto.graph.sparse_initializer) == 0
    assert not any(n.domain == "sparsegpt_export" for n in proto.graph.node)
    inits = {t.name: t for t in proto.graph.initializer}
    # no float copy of a compressed weight is left in the graph
    assert not any(name in inits for name in (f"{k}.weight" for k in records))
    # unpack a single layer's and a packed pair's nibbles and scales and compare with the compress output exactly
    tensors = load_file(str(tmp / "c" / "model.safetensors"))
    for label, parts in (("model.layers.1.mlp.down_proj", ["down_proj"]),
                         ("model.layers.1.mlp.gate_up_proj", ["gate_proj", "up_proj"])):
        w = torch.cat([tensors[f"model.layers.1.mlp.{p}.weight"] for p in parts])
        B = onnx.numpy_helper.to_array(inits[f"{label}.qweight"])
        S = onnx.numpy_helper.to_array(inits[f"{label}.scales"])
        rows, cols = w.shape
        codes = np.stack([B & 15, B >> 4], axis=-1).reshape(rows, -1)[:, :cols].astype(np.float32)
        attrs = {a.name: onnx.helper.get_attribute_value(a)
                 for a in next(n for n in nodes if n.name.startswith(label)).attribute}
        assert attrs["bits"] == 4 and attrs["block_size"] == 32 and attrs["K"] == cols and attrs["N"] == rows
        assert attrs["accuracy_level"] == 0
        values = (codes - 8) * np.repeat(S.reshape(rows, -1), 32, axis=1)[:, :cols]
        assert np.array_equal(values.astype(np.float32), w.float().numpy())
    name = "model.layers.1.mlp.down_proj"
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta["sparsegpt_export.pattern"]) == "2:4"
    assert json.loads(meta["sparsegpt_export.onnx_quant"]) == "matmulnbits"
    assert json.loads(meta["sparsegpt_export.layers"])[name]["onnx"] == "MatMulNBits"
    side = json.loads((exported / "sparsegpt_onnx.json").read_text())
    # 4 bits + a float32 scale per 32 weights: 0.5/4 + 4/(32*4) of the float32 bytes
    assert side["compressed_initializer_bytes"] / side["compressed_float32_bytes"] == pytest.approx(0.125 + 1 / 32)


@pytest.mark.parametrize("level,tol", [(0, 1e-3), (1, 1e-3), (4, 2e-2)])
def test_logits_parity_by_accuracy_level(compressed, exported, level, tol):
    _, _, ref = compressed
    ids = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = ref(ids).logits
    got = _prefill_logits(_session_with_level(exported / "model.onnx", level), ids, 2, 16)
    assert _rel(want, got) < tol


def test_runner_generates_like_torch(compressed, exported):
    from transformers import pipeline

    from sparsegpt_export.onnx import OnnxCausalLM

    _, _, ref = compressed
    model = OnnxCausalLM.from_pretrained(exported, num_threads=1)
    tok = byte_tokenizer()
    enc = tok(["the quick brown fox", "hi"], return_tensors="pt", padding=True, padding_side="left")
    want = ref.generate(**enc, max_new_tokens=32, do_sample=False)
    got = model.generate(**enc, max_new_tokens=32, do_sample=False)
    assert torch.equal(want, got)  # greedy, batched with left padding, KV cache through the graph
    # decode steps reuse the cache: the logits of one step match a full forward of the same tokens
    out = model(enc["input_ids"], attention_mask=enc["attention_mask"])
    step = model(got[:, enc["input_ids"].shape[1]:][:, :1], attention_mask=torch.cat(
        [enc["attention_mask"], torch.ones(2, 1, dtype=torch.long)], 1), past_key_values=out.past_key_values)
    with torch.no_grad():
        full = ref(torch.cat([enc["input_ids"], got[:, enc["input_ids"].shape[1]:][:, :1]], 1),
                   attention_mask=torch.cat([enc["attention_mask"], torch.ones(2, 1, dtype=torch.long)], 1)).logits
    assert _rel(full[:, -1], step.logits[:, -1]) < 1e-3
    torch.manual_seed(0)
    sampled = model.generate(**enc, max_new_tokens=8, do_sample=True, top_k=20)
    assert sampled.shape == (2, enc["input_ids"].shape[1] + 8)
    pipe = pipeline("text-generation", model=model, tokenizer=tok)
    text = pipe("the quick", max_new_tokens=6, do_sample=False)[0]["generated_text"]
    assert text.startswith("the quick") and len(text) > len("the quick")


def test_generate_modes_and_torch_threads(compressed, exported):
    """Sampling, beam search and assisted decoding through `OnnxCausalLM.generate` give torch's tokens; while
    ``generate`` runs torch is on ``torch_threads`` threads (1 by default), and its setting is restored after."""
    from transformers import LogitsProcessor, LogitsProcessorList

    from sparsegpt_export.onnx import OnnxCausalLM

    _, _, ref = compressed
    model = OnnxCausalLM.from_pretrained(exported, num_threads=1)
    ids = torch.randint(3, 256, (2, 10), generator=torch.Generator().manual_seed(9))

    class Seen(LogitsProcessor):
        def __init__(self):
            self.threads = set()

        def __call__(self, input_ids, scores):
            self.threads.add(torch.get_num_threads())
            return scores

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        seen = Seen()
        model.generate(ids, max_new_tokens=3, do_sample=False, logits_processor=LogitsProcessorList([seen]))
        assert seen.threads == {1} and torch.get_num_threads() == 2
        model.torch_threads, seen = None, Seen()
        model.generate(ids, max_new_tokens=3, do_sample=False, logits_processor=LogitsProcessorList([seen]))
        assert seen.threads == {2}
        model.torch_threads = 1
    finally:
        torch.set_num_threads(before)
    for kwargs in ({"do_sample": True, "top_k": 20, "temperature": 0.8},
                   {"do_sample": True, "top_p": 0.9, "num_return_sequences": 2},
                   {"num_beams": 4, "num_return_sequences": 2, "do_sample": False},
                   {"num_beams": 2, "do_sample": True}):
        torch.manual_seed(3)
        want = ref.generate(ids, max_new_tokens=12, **kwargs)
        torch.manual_seed(3)
        got = model.generate(ids, max_new_tokens=12, **kwargs)
        assert torch.equal(want, got), kwargs
    # assisted decoding (the assistant proposes, the ONNX model verifies; the cache is cropped): greedy tokens kept
    greedy = model.generate(ids[:1], max_new_tokens=12, do_sample=False)
    assert torch.equal(model.generate(ids[:1], max_new_tokens=12, do_sample=False, assistant_model=ref), greedy)

def test_run_command(exported, capsys):
    from sparsegpt_export.cli import main

    assert main(["run", str(exported), "--prompt", "hello", "--max-new-tokens", "5", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "[5 tokens in" in out


def test_missing_external_data_is_a_clear_error(exported, tmp_path):
    import shutil

    from sparsegpt_export.onnx import OnnxCausalLM, OnnxModelError

    d = tmp_path / "ext"
    shutil.copytree(exported, d)
    proto = onnx.load(str(d / "model.onnx"))
    onnx.save(proto, str(d / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
              location="model.onnx.data", size_threshold=1024)
    OnnxCausalLM.from_pretrained(d, num_threads=1)  # complete: opens
    (d / "model.onnx.data").unlink()
    with pytest.raises(OnnxModelError, match="model.onnx.data.*missing"):
        OnnxCausalLM.from_pretrained(d, num_threads=1)


def test_qdq_asymmetric_and_float_graph(compressed, tmp_path):
    """Asymmetric grids as UINT4 DequantizeLinear (block_size = group) + MatMul; and the float32 baseline."""
    from transformers import AutoModelForCausalLM

    from sparsegpt_export.converters import onnx as onnx_export

    _, saved, _ = compressed
    assert compress_tiny(saved, tmp_path / "c", "--asym", "--pattern", "4:8") == 0
    ref = AutoModelForCausalLM.from_pretrained(tmp_path / "c").eval()
    onnx_export.export(tmp_path / "c", tmp_path / "qdq", onnx_quant="qdq")
    proto = onnx.load(str(tmp_path / "qdq" / "model.onnx"))
    dq = [n for n in proto.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dq) == 14
    inits = {t.name: t for t in proto.graph.initializer}
    assert inits[dq[0].input[0]].data_type == onnx.TensorProto.UINT4
    assert inits[dq[0].input[2]].data_type == onnx.TensorProto.UINT4
    assert {a.name: a.i for a in dq[0].attribute} == {"axis": 0, "block_size": 32}
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # no fusion to int8-activation MatMulNBits
    sess = ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    ids = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = ref(ids).logits
    assert _rel(want, _prefill_logits(sess, ids, 2, 16)) < 1e-3


def test_float_graph_external_data_and_bad_input(compressed, tmp_path, monkeypatch):
    from sparsegpt_export.converters import onnx as onnx_export
    from sparsegpt_export.converters.onnx import OnnxExportError
    from sparsegpt_export.onnx import OnnxCausalLM

    tmp, saved, ref = compressed
    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_BYTES", 0)  # as if the weights passed protobuf's 2 GB
    onnx_export.export(tmp / "c", tmp_path / "none", onnx_quant="none")
    assert (tmp_path / "none" / "model.onnx.data").stat().st_size > (tmp_path / "none" / "model.onnx").stat().st_size
    proto = onnx.load(str(tmp_path / "none" / "model.onnx"))
    assert not any(n.op_type in ("MatMulNBits", "DequantizeLinear") for n in proto.graph.node)
    OnnxCausalLM.from_pretrained(tmp_path / "none", num_threads=1)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(tmp_path / "none" / "model.onnx"), opts, providers=["CPUExecutionProvider"])
    ids = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = ref(ids).logits
    assert _rel(want, _prefill_logits(sess, ids, 2, 16)) < 1e-5
    # nothing quantized: MatMulNBits refuses and says how to get the float graph
    assert compress_tiny(saved, tmp_path / "pruned", "--bits", "none") == 0
    with pytest.raises(OnnxExportError, match="no quantized layers.*--onnx-quant none"):
        onnx_export.export(tmp_path / "pruned", tmp_path / "x", onnx_quant="matmulnbits")
    assert compress_tiny(saved, tmp_path / "q8", "--bits", "8") == 0
    with pytest.raises(OnnxExportError, match=r"layer model\.layers\.0\.\S+ is 8-bit"):
        onnx_export.export(tmp_path / "q8", tmp_path / "x", onnx_quant="qdq")
    with pytest.raises(OnnxExportError, match="--onnx-quant 'int8'"):
        onnx_export.export(tmp / "c", tmp_path / "x", onnx_quant="int8")
    assert not (tmp_path / "x").exists()


def test_gpt2_conv1d_with_quantized_lm_head(tmp_path):
    """GPT-2's Conv1D layers and a tied lm_head quantized by --quantize-lm-head: all MatMulNBits, parity."""
    from transformers import AutoModelForCausalLM

    from sparsegpt_export.converters import onnx as onnx_export
    from sparsegpt_export.io import load_records
    from sparsegpt_export.onnx import OnnxCausalLM

    model = make_model("gpt2")
    emb = model.transformer.wte.weight.detach().clone()
    assert compress_tiny(save_tiny(tmp_path, "gpt2", model), tmp_path / "c", "--quantize-lm-head") == 0
    rec = load_records(tmp_path / "c")["lm_head"]
    assert rec.pattern == "dense" and rec.sparsity == 0.0 and rec.bits == 4
    ref = AutoModelForCausalLM.from_pretrained(tmp_path / "c").eval()
    assert not ref.config.tie_word_embeddings
    assert torch.equal(ref.transformer.wte.weight, emb)  # the embedding stays float
    assert not torch.equal(ref.lm_head.weight, emb)
    onnx_export.export(tmp_path / "c", tmp_path / "o", accuracy_level=0)
    proto = onnx.load(str(tmp_path / "o" / "model.onnx"))
    assert sum(n.op_type == "MatMulNBits" for n in proto.graph.node) == 9  # 4 per block + the lm_head
    om = OnnxCausalLM.from_pretrained(tmp_path / "o", num_threads=1)
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert _rel(ref(ids).logits, om(ids).logits) < 1e-3
    assert torch.equal(ref.generate(ids, max_new_tokens=32, do_sample=False),
                       om.generate(ids, max_new_tokens=32, do_sample=False))


def test_quantized_lm_head_in_the_other_exports(compressed, tmp_path):
    """A --quantize-lm-head output through compressed-tensors (lm_head W4A16 too) and sparse24 loads back exactly."""
    from transformers import AutoModelForCausalLM

    import sparsegpt_export  # noqa: F401  (registers the sparse24 loader)
    from sparsegpt_export.converters import compressed_tensors, sparse24

    _, saved, _ = compressed
    assert compress_tiny(saved, tmp_path / "c", "--quantize-lm-head") == 0
    ref = AutoModelForCausalLM.from_pretrained(tmp_path / "c").eval()
    compressed_tensors.export(tmp_path / "c", tmp_path / "ct", dtype="float32")
    sparse24.export(tmp_path / "c", tmp_path / "s24", dtype="float32")
    for d in ("ct", "s24"):
        got = AutoModelForCausalLM.from_pretrained(tmp_path / d, dtype=torch.float32).eval()
        ids = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(6))
        with torch.no_grad():
            assert torch.equal(ref(ids).logits, got(ids).logits), d


def test_benchmark_helpers_measure_the_real_graph(compressed, exported):
    """benchmarks/onnx_cpu.py's byte count and decode loop, on the tiny export."""
    from benchmarks.studies.onnx_cpu import Loop, compressed_bytes, ort_model

    side = json.loads((exported / "sparsegpt_onnx.json").read_text())
    counted = compressed_bytes(exported / "model.onnx")
    assert counted["matmulnbits_nodes"] == 8
    assert counted["initializer_bytes"] == side["compressed_initializer_bytes"]
    assert counted["float32_bytes"] == side["compressed_float32_bytes"]
    _, _, ref = compressed
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(7)).numpy()
    loop, tl = Loop(ort_model(exported, 1, 0)), Loop(ref)
    assert loop.decode(loop.prefill(ids), 10, 12) == tl.decode(tl.prefill(ids), 10, 12)


def test_traced_graph_without_the_exporter_is_a_clear_error(compressed, tmp_path, monkeypatch):
    """transformers before 5.13 has no ONNX exporter: the traced graph (and --ort-fusions) are refused by name, and
    nothing is written."""
    import sys

    from sparsegpt_export.converters import onnx as onnx_export

    tmp, _, _ = compressed
    monkeypatch.setitem(sys.modules, "transformers.exporters", None)
    with pytest.raises(onnx_export.OnnxExportError, match="traced ONNX graph needs transformers' ONNX exporter"):
        onnx_export.export(tmp / "c", tmp_path / "t", onnx_graph="traced", accuracy_level=0)
    with pytest.raises(onnx_export.OnnxExportError, match="--ort-fusions cpu: transformers"):
        onnx_export.export(tmp / "c", tmp_path / "t", ort_fusions="cpu", accuracy_level=0)
    assert not (tmp_path / "t").exists()


def test_ort_fusions_keep_the_results(compressed, tmp_path):
    """--ort-fusions cpu: norms and rotary embeddings become ONNX Runtime ops; logits and greedy text unchanged."""
    from sparsegpt_export.converters import onnx as onnx_export
    from sparsegpt_export.onnx import OnnxCausalLM

    tmp, _, ref = compressed
    if not onnx_export.exporter_takes_fusions():  # transformers < 5.23: refused before any work, nothing written
        with pytest.raises(onnx_export.OnnxExportError, match="--ort-fusions cpu: transformers .* came in transformers 5.23"):
            onnx_export.export(tmp / "c", tmp_path / "fused", accuracy_level=0, ort_fusions="cpu")
        assert not (tmp_path / "fused").exists()
        return
    onnx_export.export(tmp / "c", tmp_path / "fused", accuracy_level=0, ort_fusions="cpu")
    ops = {n.op_type for n in onnx.load(str(tmp_path / "fused" / "model.onnx")).graph.node}
    assert {"MatMulNBits", "SkipSimplifiedLayerNormalization", "RotaryEmbedding"} <= ops
    model = OnnxCausalLM.from_pretrained(tmp_path / "fused", num_threads=1)
    assert model.export_info["ort_fusions"] == "cpu"
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        assert _rel(ref(ids).logits, model(ids).logits) < 1e-3
    assert torch.equal(ref.generate(ids, max_new_tokens=32, do_sample=False),
                       model.generate(ids, max_new_tokens=32, do_sample=False))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_gqa_graph_matches_torch(tmp_path, arch):
    """The gqa graph (the default for these architectures): ONNX Runtime's fused ops, same inputs and outputs as the
    traced graph, logits and greedy text of a left-padded batch as torch; the cache buffers shared in place grow
    past their first capacity (a 200-token prompt, 400 new tokens) and beam search reorders them."""
    from transformers import AutoModelForCausalLM

    from sparsegpt_export.converters import onnx as onnx_export
    from sparsegpt_export.onnx import OnnxCausalLM

    saved = save_tiny(tmp_path, arch)
    assert compress_tiny(saved, tmp_path / "c") == 0
    ref = AutoModelForCausalLM.from_pretrained(tmp_path / "c").eval()
    onnx_export.export(tmp_path / "c", tmp_path / "gqa", accuracy_level=0)
    proto = onnx.load(str(tmp_path / "gqa" / "model.onnx"))
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("GroupQueryAttention") == 2 and "RotaryEmbedding" not in ops  # the rotary inside the attention
    gqa = [n for n in proto.graph.node if n.op_type == "GroupQueryAttention"]
    assert all(n.input[1] == n.input[2] == "" and n.input[9] == "position_ids" for n in gqa)  # q/k/v packed
    assert ops.count("MatMulNBits") == 8 and ops.count("Split") == 2 and "Transpose" not in ops  # gate/up split
    model = OnnxCausalLM.from_pretrained(tmp_path / "gqa", num_threads=1)
    assert model.export_info["onnx_graph"] == "gqa" and model.share_kv_buffer
    assert model.export_info["positions"] == "absolute"  # the runner feeds each row's index (see OnnxCausalLM)
    assert [i.name for i in model.session.get_inputs()][:3] == ["input_ids", "attention_mask", "position_ids"]
    ids = torch.randint(3, 256, (2, 200), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[1, :9] = 0  # left padding
    with torch.no_grad():
        want = ref(ids, attention_mask=mask).logits
    got = model(ids, attention_mask=mask).logits
    keep = mask.bool()
    assert _rel(want[keep], got[keep]) < 1e-3
    a = ref.generate(input_ids=ids, attention_mask=mask, max_new_tokens=400, min_new_tokens=400, do_sample=False)
    b = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=400, min_new_tokens=400, do_sample=False)
    assert torch.equal(a, b)
    short = ids[:, :20], mask[:, :20]
    a = ref.generate(input_ids=short[0], attention_mask=short[1], max_new_tokens=12, num_beams=3, do_sample=False)
    b = model.generate(input_ids=short[0], attention_mask=short[1], max_new_tokens=12, num_beams=3, do_sample=False)
    assert torch.equal(a, b)


def test_shared_kv_buffer_writes_in_place(compressed, tmp_path):
    """With buffer sharing a decode step adds to the same memory (the returned cache is a view of it), gives the
    same logits as without it, and a cache that is not a view of the buffers (a copy) is taken over correctly."""
    from sparsegpt_export.converters import onnx as onnx_export
    from sparsegpt_export.onnx import OnnxCausalLM

    tmp, _, _ = compressed
    onnx_export.export(tmp / "c", tmp_path / "gqa", accuracy_level=0, onnx_graph="gqa")
    shared = OnnxCausalLM.from_pretrained(tmp_path / "gqa", num_threads=1)
    plain = OnnxCausalLM.from_pretrained(tmp_path / "gqa", num_threads=1, share_kv_buffer=False)
    ids = torch.randint(0, 256, (1, 30), generator=torch.Generator().manual_seed(5))
    first = shared(ids[:, :20])
    ptr = first.past_key_values.layers[0].keys.data_ptr()
    step = shared(ids[:, 20:21], past_key_values=first.past_key_values)
    assert step.past_key_values.layers[0].keys.data_ptr() == ptr
    assert step.past_key_values.get_seq_length() == 21
    assert step.past_key_values is first.past_key_values  # grown in place, as a DynamicCache grows
    assert all(layer.keys.shape[-2] == 21 for layer in step.past_key_values.layers)
    ref_first = plain(ids[:, :20])
    ref_step = plain(ids[:, 20:21], past_key_values=ref_first.past_key_values)
    assert torch.equal(step.logits, ref_step.logits)
    for layer_a, layer_b in zip(step.past_key_values.layers, ref_step.past_key_values.layers):
        assert torch.equal(layer_a.keys, layer_b.keys) and torch.equal(layer_a.values, layer_b.values)
    # a crop (assisted decoding) keeps the buffers: the next step writes over the dropped position
    step2 = shared(ids[:, 21:22], past_key_values=step.past_key_values)
    step2.past_key_values.crop(-1)
    assert step2.past_key_values.get_seq_length() == 21
    again = shared(ids[:, 21:22], past_key_values=step2.past_key_values)
    assert again.past_key_values.layers[0].keys.data_ptr() == ptr
    ref_step2 = plain(ids[:, 21:22], past_key_values=ref_step.past_key_values)
    assert torch.equal(again.logits, ref_step2.logits) and again.past_key_values.get_seq_length() == 22
    # a cache of copies (as beam search's reorder makes) is copied into fresh buffers, not trusted
    more = shared(ids[:, 21:30], past_key_values=ref_step.past_key_values)
    assert more.past_key_values.layers[0].keys.data_ptr() != ptr
    ref_more = plain(ids[:, 21:30], past_key_values=ref_step.past_key_values)
    assert torch.equal(more.logits, ref_more.logits)


def test_default_accuracy_level_follows_smoothing(compressed, tmp_path, capsys):
    """``--accuracy-level auto`` (the default): level 1 (float compute) for an unsmoothed compress output, level 4
    (int8 activations) for a smoothed one (--smooth-alpha, or compress's default with --bits on a Llama-style
    model); the choice and its reason in the sidecar."""
    from sparsegpt_export.cli import main

    tmp, saved, _ = compressed
    assert compress_tiny(saved, tmp_path / "cs", "--smooth-alpha", "0.5") == 0
    assert compress_tiny(saved, tmp_path / "c0", "--smooth-alpha", "0") == 0
    for src, level in ((tmp_path / "c0", 1), (tmp_path / "cs", 4), (tmp / "c", 4)):
        out = tmp_path / f"o-{src.name}"
        assert main(["export", str(src), "--format", "onnx", "--out", str(out)]) == 0
        side = json.loads((out / "sparsegpt_onnx.json").read_text())
        assert side["accuracy_level"] == level and ("not smoothed" in side["accuracy_level_choice"]) == (level == 1)
        nodes = [n for n in onnx.load(str(out / "model.onnx")).graph.node if n.op_type == "MatMulNBits"]
        assert len(nodes) == 8 and all(
            next(a.i for a in n.attribute if a.name == "accuracy_level") == level for n in nodes)
    assert compress_tiny(saved, tmp_path / "g64", "--group-size", "64") == 0  # level 4: int8 blocks of 32 columns
    for level, block in ((4, 32), (1, 64)):
        out = tmp_path / f"g64-{level}"
        assert main(["export", str(tmp_path / "g64"), "--format", "onnx", "--accuracy-level", str(level),
                     "--out", str(out)]) == 0
        nodes = [n for n in onnx.load(str(out / "model.onnx")).graph.node if n.op_type == "MatMulNBits"]
        assert {next(a.i for a in n.attribute if a.name == "block_size") for n in nodes} == {block}
    out = tmp_path / "o-given"
    assert main(["export", str(tmp / "c"), "--format", "onnx", "--accuracy-level", "4", "--out", str(out)]) == 0
    assert json.loads((out / "sparsegpt_onnx.json").read_text())["accuracy_level_choice"] == "given"
    with pytest.raises(SystemExit):
        main(["export", str(tmp / "c"), "--format", "onnx", "--accuracy-level", "5", "--out", str(tmp_path / "x")])
    assert "--accuracy-level: '5': choose auto, 0, 1, 2, 3 or 4" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_onnx_graph_option(compressed, tmp_path, capsys):
    from sparsegpt_export.cli import main
    from sparsegpt_export.converters import onnx as onnx_export

    tmp, _, _ = compressed
    with pytest.raises(ValueError, match="--onnx-graph 'fused'"):
        onnx_export.export(tmp / "c", tmp_path / "x", onnx_graph="fused")
    with pytest.raises(ValueError, match="--ort-fusions applies to the traced graph"):
        onnx_export.export(tmp / "c", tmp_path / "x", onnx_graph="gqa", ort_fusions="cpu")
    assert main(["export", str(tmp / "c"), "--format", "dense", "--onnx-graph", "gqa", "--out", str(tmp_path / "d")]) != 0
    assert "--onnx-graph: apply to --format onnx only" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "d").exists()
    # qdq stays portable: auto keeps the traced graph for it
    onnx_export.export(tmp / "c", tmp_path / "q", onnx_quant="qdq")
    assert json.loads((tmp_path / "q" / "sparsegpt_onnx.json").read_text())["onnx_graph"] == "traced"


def test_gqa_graph_refuses_other_architectures(tmp_path):
    from sparsegpt_export.converters import onnx as onnx_export

    saved = save_tiny(tmp_path, "gpt2")
    assert compress_tiny(saved, tmp_path / "c") == 0
    with pytest.raises(ValueError, match="model type 'gpt2'.*--onnx-graph traced"):
        onnx_export.export(tmp_path / "c", tmp_path / "x", onnx_graph="gqa")
    assert not (tmp_path / "x").exists()


def test_matmulnbits_block_size_avoids_padding():
    """The block is the group's largest power of two that also divides the columns (no padded last block)."""
    from sparsegpt_export.converters.onnx import OnnxExportError, _block_size

    assert _block_size("l", 128, 576) == 64  # SmolLM2: 9 blocks of 64, not 4.5 of 128
    assert _block_size("l", 128, 1536) == 128
    assert _block_size("l", None, 576) == 64  # per-channel grids as groups of 128
    assert _block_size("l", 96, 576) == 32
    assert _block_size("l", 48, 100) == 16  # nothing >= 16 divides 100: padded blocks of 16
    assert _block_size("l", 128, 576, largest=32) == 32  # accuracy_level 4: int8 activations per 32 columns
    assert _block_size("l", 48, 100, largest=32) == 16
    with pytest.raises(OnnxExportError, match="layer l: group size 24"):
        _block_size("l", 24, 96)
