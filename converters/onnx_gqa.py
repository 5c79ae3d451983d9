"""The ``gqa`` ONNX graph: a Llama-family decoder written node by node with ONNX Runtime's fused operators.

The traced graph (``--onnx-graph traced``) is what ``torch.onnx.export`` makes of the transformers code: about
70 nodes per decoder layer, the key/value heads repeated for every query head (``repeat_kv``) and transposed
on every step. At one token per step that bookkeeping costs more than the 4-bit matmuls themselves. This
builder writes the same model as ONNX Runtime's own model builders do, with the same inputs and outputs as the
traced graph so that `OnnxCausalLM` runs either:

- ``SimplifiedLayerNormalization`` / ``com.microsoft.SkipSimplifiedLayerNormalization`` for RMSNorm and the
  residual adds;
- the linear layers as ``com.microsoft.MatMulNBits`` from our codes (or ``DequantizeLinear`` + ``MatMul``, or
  float ``MatMul``), exactly as in the traced graph, except that q/k/v and gate/up, which read the same input, are
  packed into one matmul each (their rows stacked, codes and scales unchanged); gate/up is split after it, the
  packed q/k/v goes into the attention as it is;
- ``com.microsoft.GroupQueryAttention`` over the past keys and values (no repeated heads), the rotary embedding
  done inside it (``do_rotary``) with the model's own cos/sin tables, the padding of ``attention_mask`` passed as
  ``attention_bias``. ONNX Runtime takes a prompt's positions from the cache length and only later steps' from
  ``position_ids``, so the export records ``positions: absolute`` and `OnnxCausalLM` feeds each row's absolute
  index (a left-padded row is shifted by its padding throughout: transformers' relative positions). Packed
  q/k/v and the rotary inside take 90 small nodes per decode step off SmolLM2's graph (a Split and two
  RotaryEmbedding per layer);
- SiLU as ``com.microsoft.QuickGelu`` with alpha 1 (x·sigmoid(x)).

Supported: ``llama``, ``mistral`` and ``qwen2`` checkpoints with SiLU MLPs, a full-length attention (no sliding
window) and rotary tables that do not change with the sequence length. `unsupported` says why another one is not,
and ``--onnx-graph auto`` then falls back to the traced graph.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import torch

MODEL_TYPES = ("llama", "mistral", "qwen2")
STATIC_ROPE = ("default", "linear", "llama3", "yarn")
MASKED = 1.0e9  # attention_bias is (mask - 1) * MASKED: -1e9 at padded keys, large but finite (a fully padded row
# stays a valid softmax)


def unsupported(model) -> Optional[str]:
    """Why ``model`` (a loaded transformers causal LM) cannot be written as the ``gqa`` graph, or None."""
    cfg = model.config
    if cfg.model_type not in MODEL_TYPES:
        return f"model type {cfg.model_type!r} (the gqa graph covers {', '.join(MODEL_TYPES)})"
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"hidden_act {cfg.hidden_act!r} (the gqa graph writes SiLU MLPs)"
    window = getattr(cfg, "sliding_window", None)
    if window is not None and getattr(cfg, "use_sliding_window", True) and window < cfg.max_position_embeddings:
        return f"sliding-window attention ({window} tokens)"
    rotary = getattr(getattr(model, "model", None), "rotary_emb", None)
    if rotary is None or not hasattr(rotary, "inv_freq"):
        return "no rotary embedding module at model.model.rotary_emb"
    if getattr(rotary, "rope_type", "default") not in STATIC_ROPE:
        return f"rope type {rotary.rope_type!r} changes its tables with the sequence length"
    return None


def _rope_tables(model) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin [max_position_embeddings, head_dim/2] as transformers computes them (float32, scaled)."""
    rotary = model.model.rotary_emb
    pos = torch.arange(model.config.max_position_embeddings, dtype=torch.float32)
    freqs = pos[:, None] * rotary.inv_freq.float()[None, :]
    scale = float(getattr(rotary, "attention_scaling", 1.0))
    return (freqs.cos() * scale).numpy(), (freqs.sin() * scale).numpy()


def build(model, linear: Callable, opset: int = 21):
    """The ``gqa`` graph of ``model`` as an ``onnx_ir.Model``.

    ``linear(graph, [(name, module), ...], x, split=True)`` adds the nodes of linear layers that share the input
    value ``x`` (``name`` the module path) and returns their output values; the caller decides MatMulNBits, QDQ or
    float per layer, and may pack layers of the same kind into one matmul (q/k/v, gate/up) split afterwards; with
    ``split=False`` it may return the packed output alone (one value for all the layers, their outputs concatenated).
    """
    import onnx_ir as ir

    reason = unsupported(model)
    if reason:
        raise ValueError(f"--onnx-graph gqa: {reason}")
    cfg = model.config
    g = GraphBuilder()
    sh = _shared(g, model)
    embed = model.get_input_embeddings().weight.detach().float().numpy()
    x = g.op("Gather", [g.initializer("model.embed_tokens.weight", embed), sh.input_ids], "model.embed_tokens", axis=0)
    residual, hidden = x, None
    for i, layer in enumerate(model.model.layers):
        hidden, residual = _decoder_layer(g, sh, i, layer, linear, hidden, residual)
    h, _ = _norm(g, "model.norm", model.model.norm, hidden, residual, sh.eps)
    (logits,) = linear(g, [("lm_head", model.get_output_embeddings())], h)
    g.output(logits, "logits", ir.DataType.FLOAT, ["batch", "sequence", cfg.vocab_size])
    # the cache outputs were declared layer by layer; logits goes first, as in the traced graph
    g.outputs.insert(0, g.outputs.pop())
    graph = ir.Graph(g.inputs, g.outputs, nodes=g.nodes, initializers=g.initializers,
                     opset_imports={"": opset, "com.microsoft": 1}, name="sparsegpt_export_gqa")
    return ir.Model(graph, ir_version=10, producer_name="sparsegpt-export")


@dataclass
class _Shared:
    """What every decoder layer of the graph reads: inputs, the cache length, the padding bias, rotary tables."""

    input_ids: Any
    position_ids: Any
    past: list
    seqlens_k: Any
    total_scalar: Any
    bias: Any
    cos_cache: Any
    sin_cache: Any
    heads: int
    kv_heads: int
    head_dim: int
    eps: float


def _shared(g: "GraphBuilder", model) -> _Shared:
    """The graph's inputs and the values shared by every layer: the cache length, the padding as an additive
    bias, the rotary tables."""
    import onnx_ir as ir

    cfg = model.config
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    f32, i64 = ir.DataType.FLOAT, ir.DataType.INT64
    input_ids = g.input("input_ids", i64, ["batch", "sequence"])
    mask = g.input("attention_mask", i64, ["batch", "total_sequence"])
    position_ids = g.input("position_ids", i64, ["batch", "sequence"])
    past = [(g.input(f"input.past_key_values.layers.{i}.keys", f32, ["batch", kv_heads, "past_sequence", head_dim]),
             g.input(f"input.past_key_values.layers.{i}.values", f32, ["batch", kv_heads, "past_sequence", head_dim]))
            for i in range(len(model.model.layers))]
    batch = g.op("Shape", [input_ids], "shape/batch", start=0, end=1)
    seq = g.op("Shape", [input_ids], "shape/sequence", start=1, end=2)
    total = g.op("Shape", [mask], "shape/total", start=1, end=2)
    total32 = g.op("Cast", [total], "shape/total_int32", to=ir.DataType.INT32)
    total_scalar = g.op("Reshape", [total32, g.const("scalar_shape", np.zeros(0, np.int64))], "shape/total_scalar")
    seqlens_k = g.op("Expand", [g.op("Sub", [total_scalar, g.const("one_int32", np.array(1, np.int32))],
                                     "shape/last_position"), batch], "shape/seqlens_k")
    padded = g.op("Sub", [g.op("Cast", [mask], "bias/mask_float", to=f32), g.const("one", np.array(1, np.float32))],
                  "bias/padded")
    bias = g.op("Mul", [padded, g.const("masked", np.array(MASKED, np.float32))], "bias/scaled")
    bias = g.op("Unsqueeze", [bias, g.const("axes_1_2", np.array([1, 2], np.int64))], "bias/unsqueeze")
    bias_shape = g.op("Concat", [batch, g.const("one_int64", np.array([1], np.int64)), seq, total], "bias/shape", axis=0)
    bias = g.op("Expand", [bias, bias_shape], "bias/expand")
    cos, sin = _rope_tables(model)
    return _Shared(input_ids=input_ids, position_ids=position_ids, past=past, seqlens_k=seqlens_k,
                   total_scalar=total_scalar, bias=bias, cos_cache=g.initializer("rotary.cos_cache", cos),
                   sin_cache=g.initializer("rotary.sin_cache", sin), heads=heads, kv_heads=kv_heads,
                   head_dim=head_dim, eps=float(cfg.rms_norm_eps))


def _decoder_layer(g: "GraphBuilder", sh: _Shared, i: int, layer, linear: Callable, hidden, residual):
    """Decoder layer ``i``: norm, packed q/k/v into GroupQueryAttention over the cache, o_proj, norm, SwiGLU MLP.
    Returns ``(hidden, residual)`` for the next layer's norm."""
    import onnx_ir as ir

    f32 = ir.DataType.FLOAT
    p = f"model.layers.{i}"
    attn = layer.self_attn
    h, residual = _norm(g, p + ".input_layernorm", layer.input_layernorm, hidden, residual, sh.eps)
    qkv = linear(g, [(p + ".self_attn.q_proj", attn.q_proj), (p + ".self_attn.k_proj", attn.k_proj),
                     (p + ".self_attn.v_proj", attn.v_proj)], h, split=False)
    q, k, v = (qkv[0], None, None) if len(qkv) == 1 else qkv  # packed: the query input holds all three
    out, present_k, present_v = g.op(
        "GroupQueryAttention",
        [q, k, v, sh.past[i][0], sh.past[i][1], sh.seqlens_k, sh.total_scalar, sh.cos_cache, sh.sin_cache,
         sh.position_ids, sh.bias],
        p + ".self_attn/GroupQueryAttention", domain="com.microsoft", num_outputs=3,
        num_heads=sh.heads, kv_num_heads=sh.kv_heads, scale=float(getattr(attn, "scaling", sh.head_dim ** -0.5)),
        do_rotary=1, rotary_interleaved=0)
    kv_dims = ["batch", sh.kv_heads, "total_sequence", sh.head_dim]
    g.output(present_k, f"output.past_key_values.layers.{i}.keys", f32, kv_dims)
    g.output(present_v, f"output.past_key_values.layers.{i}.values", f32, kv_dims)
    (hidden,) = linear(g, [(p + ".self_attn.o_proj", attn.o_proj)], out)
    h, residual = _norm(g, p + ".post_attention_layernorm", layer.post_attention_layernorm, hidden, residual, sh.eps)
    mlp = layer.mlp
    gate, up = linear(g, [(p + ".mlp.gate_proj", mlp.gate_proj), (p + ".mlp.up_proj", mlp.up_proj)], h)
    act = g.op("QuickGelu", [gate], p + ".mlp/silu", domain="com.microsoft", alpha=1.0)
    (hidden,) = linear(g, [(p + ".mlp.down_proj", mlp.down_proj)], g.op("Mul", [act, up], p + ".mlp/mul"))
    return hidden, residual


def _norm(g: "GraphBuilder", name: str, module, hidden, residual, eps: float):
    """RMSNorm of ``residual + hidden`` (just ``residual`` for the first); returns (normed, new residual)."""
    weight = g.initializer(name + ".weight", module.weight.detach().float().numpy())
    if hidden is None:
        return g.op("SimplifiedLayerNormalization", [residual, weight], name, axis=-1, epsilon=eps, stash_type=1), residual
    normed, _, _, summed = g.op("SkipSimplifiedLayerNormalization", [hidden, residual, weight], name,
                                domain="com.microsoft", num_outputs=4, epsilon=eps)
    return normed, summed


class GraphBuilder:
    """A flat list of nodes, initializers, inputs and outputs, every value named after the node that makes it."""

    def __init__(self):
        import onnx_ir as ir

        self.ir = ir
        self.nodes, self.initializers, self.inputs, self.outputs = [], [], [], []
        self.initializer_bytes: dict[str, int] = {}

    def input(self, name: str, dtype, shape: list):
        v = self.ir.Value(name=name, shape=self.ir.Shape(shape), type=self.ir.TensorType(dtype))
        self.inputs.append(v)
        return v

    def output(self, value, name: str, dtype, shape: list) -> None:
        value.name, value.shape, value.type = name, self.ir.Shape(shape), self.ir.TensorType(dtype)
        self.outputs.append(value)

    def initializer(self, name: str, array):
        v = self.ir.Value(name=name, const_value=self.ir.tensor(array, name=name))
        self.initializers.append(v)
        self.initializer_bytes[name] = v.const_value.nbytes
        return v

    def const(self, name: str, array: np.ndarray):
        return self.initializer("const." + name, array)

    def op(self, op_type: str, inputs: list, name: str, domain: str = "", num_outputs: int = 1, **attrs):
        node = self.ir.node(op_type, inputs, attributes=attrs, domain=domain, num_outputs=num_outputs, name=name)
        for j, out in enumerate(node.outputs):
            out.name = f"{name}/{op_type}_out{j}"
        self.nodes.append(node)
        return node.outputs[0] if num_outputs == 1 else list(node.outputs)
