"""``onnx``: a generation graph with a KV cache for ONNX Runtime, its 4-bit layers built from our own codes.

Two graphs (``--onnx-graph``): ``gqa``, the decoder written with ONNX Runtime's fused operators by
`converters.onnx_gqa` (Llama, Mistral, Qwen2; what ``auto`` picks for them), and ``traced``, any architecture
through transformers' ONNX exporter. The 4-bit layers, metadata and files are the same in both. How the traced
graph is made:

1. the compress output is loaded in float32 with transformers; every 4-bit layer is swapped for a marker module
   whose forward is the custom op ``sparsegpt_export::qlinear`` (eager: ``F.linear`` on the stored weights);
2. transformers' ONNX exporter (``transformers.exporters.OnnxExporter``, i.e. ``torch.onnx.export(dynamo=True)``)
   traces one graph with past inputs, for prefill and decode: inputs ``input_ids``, ``attention_mask``,
   ``position_ids`` and ``input.past_key_values.layers.<i>.{keys,values}``; outputs ``logits`` and
   ``output.past_key_values.layers.<i>.{keys,values}``. The marker op becomes the node ``QLinear`` of the
   domain ``sparsegpt_export``, which carries the layer's name;
3. each ``QLinear`` node is replaced by what ``--onnx-quant`` asks for, its tensors built from the integer
   codes and scales of the compress output (checked to reproduce every weight exactly), never re-quantized:
   - ``matmulnbits``: ``com.microsoft.MatMulNBits`` (bits 4, ``block_size`` = the group size, or the largest power
     of two that divides it and the columns, with the scales repeated; per-channel grids as groups of 128);
     symmetric grids leave out the zero points (MatMulNBits' default is 8, ours too), asymmetric ones store
     them packed. ``accuracy_level`` is written on every node: by default (``auto``) 4, int8 activations on CPU
     (the fastest), when the compress output was smoothed (``--smooth-alpha``, by default on with ``--bits`` for
     Llama-style models: ``smoothing`` in its ``sparsegpt_report.json``), with blocks of at most 32 columns
     (``INT8_BLOCK``: the activations are rounded to int8 per block), which keeps level 4 within 2e-2 of torch on
     SmolLM2, and 1 (float compute, as
     accurate as the float graph) when it was not, since int8 activations with outlier channels cost 3.8e-2 there
     (`default_accuracy_level`);
   - ``qdq``: the portable opset-21 ``DequantizeLinear`` (INT4 weights [in, out], ``block_size`` = the group
     size along axis 0; UINT4 with zero points when asymmetric) followed by ``MatMul``;
   - ``none``: no markers at all, the float32 graph (the benchmark's baseline).
   The float weight the marker carried is dropped; layers that are not 4-bit stay float ``MatMul``.
4. the N:M pattern, sparsity, the config and the export options go to the model's ``metadata_props``
   (keys ``sparsegpt_export.*``); the zeros are stored as codes, never as a ``SparseTensorProto``.

The folder gets ``model.onnx`` (with ``model.onnx.data`` beside it when the weights pass 1.8 GB, protobuf's
limit being 2 GB), ``config.json``, the tokenizer and generation config, and ``sparsegpt_onnx.json`` (the
graph's inputs and outputs, the options, and the bytes of the compressed layers). Written atomically.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sparsegpt_export.io import atomic_dir
from sparsegpt_export.records import REPORT_FILE, load_config, load_records

from . import onnx_gqa
from .common import conv1d_modules, weight_codes
from .dense import copy_side_files, read_checkpoint, read_config

FORMAT = "onnx"
MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
SIDECAR = "sparsegpt_onnx.json"
ONNX_QUANT = ("matmulnbits", "qdq", "none")
ONNX_GRAPH = ("auto", "gqa", "traced")
EXTERNAL_DATA_BYTES = 1_800_000_000
MARKER_DOMAIN = "sparsegpt_export"
MARKER_OP = "QLinear"
META_PREFIX = "sparsegpt_export."


class OnnxExportError(ValueError):
    """The compress output cannot be written as the ONNX graph asked for; the message names the layer or option."""


# ---------------------------------------------------------------------------------------------- the marker op
_REGISTERED: dict[str, Any] = {}


def _marker_op():
    """The custom op ``sparsegpt_export::qlinear`` and its ONNX translation (registered once per process)."""
    if "op" in _REGISTERED:
        return _REGISTERED["op"], _REGISTERED["translation"]
    import onnx
    from onnx.defs import OpSchema
    from onnxscript.values import Op, Opset

    @torch.library.custom_op("sparsegpt_export::qlinear", mutates_args=())
    def qlinear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], layer: str) -> torch.Tensor:
        return F.linear(x, weight, bias)

    @qlinear.register_fake
    def _(x, weight, bias, layer):
        return x.new_empty(*x.shape[:-1], weight.shape[0])

    if not onnx.defs.has(MARKER_OP, MARKER_DOMAIN):
        onnx.defs.register_schema(OpSchema(
            MARKER_OP, MARKER_DOMAIN, 1,
            inputs=[OpSchema.FormalParameter("X", "T"), OpSchema.FormalParameter("W", "T"),
                    OpSchema.FormalParameter("bias", "T", param_option=OpSchema.FormalParameterOption.Optional)],
            outputs=[OpSchema.FormalParameter("Y", "T")],
            type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "float types")],
            attributes=[OpSchema.Attribute("layer", OpSchema.AttrType.STRING, "the compressed module's name")],
        ))
    marker = Op(Opset(MARKER_DOMAIN, 1), MARKER_OP, onnx.defs.get_schema(MARKER_OP, 1, MARKER_DOMAIN))

    def translation(x, weight, bias=None, layer: str = ""):
        return marker(x, weight, layer=layer) if bias is None else marker(x, weight, bias, layer=layer)

    _REGISTERED.update(op=torch.ops.sparsegpt_export.qlinear.default, translation=translation)
    return _REGISTERED["op"], translation


class _Marked(nn.Module):
    """Stands in for a 4-bit layer during tracing: ``x @ W.T + b`` through the marker op."""

    def __init__(self, name: str, weight: torch.Tensor, bias: Optional[torch.Tensor]):
        super().__init__()
        self.layer = name
        self.weight = nn.Parameter(weight.detach().float().contiguous(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().contiguous(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.sparsegpt_export.qlinear(x, self.weight, self.bias, self.layer)


@contextlib.contextmanager
def _translation_installed():
    """Add our translation to the ONNX exporter's table for the duration of the export."""
    import transformers.exporters.exporter_onnx as xo

    table = getattr(xo, "_ONNX_TRANSLATION_TABLE", None)
    if not isinstance(table, dict):
        raise OnnxExportError(
            "this transformers version's ONNX exporter has no translation table (_ONNX_TRANSLATION_TABLE); "
            "--format onnx needs a transformers release that ships the transformers.exporters ONNX exporter"
        )
    op, fn = _marker_op()
    had = op in table
    table[op] = fn
    try:
        yield
    finally:
        if not had:
            table.pop(op, None)


# ---------------------------------------------------------------------------------------------- tensors from codes
# At accuracy_level 4 MatMulNBits rounds the activations to int8 per block of the weight: blocks of at most 32
# columns. On the default SmolLM2 compress output (2:4 + 4-bit g128, ADMM, smoothed at 0.6) the logits' relative
# error went from 2.10e-2 (blocks of 64) to 1.46e-2, at 0.94x the decode speed through generate() (2.32x against
# 2.46x the float32 graph; benchmarks/results/onnx_default_level_smoothed.log).
INT8_BLOCK = 32

def _block_size(name: str, group: Optional[int], cols: int, largest: Optional[int] = None) -> int:
    """MatMulNBits' block: the largest power of two (>= 16, <= ``largest`` when given) that divides the group size
    (128 for per-channel grids) and, where one >= 16 does, the columns too, so the last block is not padded
    (SmolLM2's 576 columns with groups of 128 get blocks of 64: 9 full blocks instead of 4.5). Each block lies
    inside one group, so repeating the group's scale is exact. At ``accuracy_level`` 4 the activations are
    quantized to int8 per block as well, so the smaller block is also the more accurate one (`INT8_BLOCK`)."""
    bs = (group or 128) & -(group or 128)
    if bs < 16:
        raise OnnxExportError(
            f"layer {name}: group size {group} has no power-of-two divisor >= 16, which MatMulNBits needs as its "
            "block size; export with --onnx-quant qdq or none"
        )
    fit = bs
    while fit >= 16 and cols % fit:
        fit //= 2
    fit = fit if fit >= 16 else bs
    return min(fit, largest) if largest else fit


def _pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """uint8 codes [..., 2k] (0..15) -> [..., k] bytes, the first of each pair in the low nibble."""
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)


def matmulnbits_tensors(name: str, codes: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor],
                        group: Optional[int], accuracy_level: int = 1) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """``B`` uint8 [N, blocks, bs/2], ``scales`` float32 [N*blocks] and (asymmetric) packed ``zero_points``; at
    ``accuracy_level`` 4 the blocks are at most `INT8_BLOCK` columns."""
    rows, cols = codes.shape
    bs = _block_size(name, group, cols, INT8_BLOCK if int(accuracy_level) == 4 else None)
    nblocks = -(-cols // bs)
    gidx = torch.arange(nblocks) * bs // (group or cols)  # the group each block lies in
    padded = torch.zeros(rows, nblocks * bs, dtype=torch.uint8)
    padded[:, :cols] = codes
    out = {
        "B": _pack_nibbles(padded.numpy()).reshape(rows, nblocks, bs // 2),
        "scales": scales.float()[:, gidx].contiguous().numpy().reshape(-1),
    }
    if zeros is not None:
        z = zeros.to(torch.uint8)[:, gidx]
        zp = torch.zeros(rows, nblocks + nblocks % 2, dtype=torch.uint8)
        zp[:, :nblocks] = z
        out["zero_points"] = _pack_nibbles(zp.numpy()).reshape(-1)
    return out, {"K": cols, "N": rows, "bits": 4, "block_size": bs}


def qdq_tensors(codes: torch.Tensor, scales: torch.Tensor, zeros: Optional[torch.Tensor],
                group: Optional[int]) -> tuple[dict[str, Any], dict[str, int]]:
    """Weights [in, out] as INT4 (symmetric: code - 8) or UINT4 (asymmetric), scales [groups, out] float32."""
    import ml_dtypes

    rows, cols = codes.shape
    if zeros is None:
        data = (codes.to(torch.int16) - 8).t().contiguous().numpy().astype(ml_dtypes.int4)
    else:
        data = codes.t().contiguous().numpy().astype(ml_dtypes.uint4)
    out: dict[str, Any] = {"weight": data}
    if group is None:  # per output channel: scales [out] along axis 1
        out["scale"] = scales.float()[:, 0].contiguous().numpy()
        if zeros is not None:
            out["zero_point"] = zeros.to(torch.uint8)[:, 0].numpy().astype(ml_dtypes.uint4)
        return out, {"axis": 1}
    out["scale"] = scales.float().t().contiguous().numpy()
    if zeros is not None:
        out["zero_point"] = zeros.to(torch.uint8).t().contiguous().numpy().astype(ml_dtypes.uint4)
    return out, {"axis": 0, "block_size": group}


# ---------------------------------------------------------------------------------------------- graph rewrite
def quant_linear_nodes(name: str, x, spec: dict, onnx_quant: str, accuracy_level: int, init) -> tuple[list, Any]:
    """The nodes of one 4-bit layer (no bias) on input value ``x``: MatMulNBits, or DequantizeLinear + MatMul.
    ``init(suffix, array)`` registers an initializer named after the layer and returns its value."""
    import onnx_ir as ir

    if onnx_quant == "matmulnbits":
        t, attrs = matmulnbits_tensors(name, spec["codes"], spec["scales"], spec["zeros"], spec["group_size"],
                                       accuracy_level)
        inputs = [x, init("qweight", t["B"]), init("scales", t["scales"])]
        if "zero_points" in t:
            inputs.append(init("zero_points", t["zero_points"]))
        mm = ir.node("MatMulNBits", inputs, attributes={**attrs, "accuracy_level": int(accuracy_level)},
                     domain="com.microsoft", name=f"{name}/MatMulNBits")
        return [mm], mm.outputs[0]
    t, attrs = qdq_tensors(spec["codes"], spec["scales"], spec["zeros"], spec["group_size"])
    dq_inputs = [init("qweight", t["weight"]), init("scales", t["scale"])]
    if "zero_point" in t:
        dq_inputs.append(init("zero_points", t["zero_point"]))
    dq = ir.node("DequantizeLinear", dq_inputs, attributes=attrs, name=f"{name}/DequantizeLinear")
    mm = ir.node("MatMul", [x, dq.outputs[0]], name=f"{name}/MatMul")
    return [dq, mm], mm.outputs[0]


def _lower_markers(model, layers: dict[str, dict], onnx_quant: str, accuracy_level: int) -> dict[str, int]:
    """Replace every ``QLinear`` node by MatMulNBits or DequantizeLinear + MatMul; returns byte counts."""
    import onnx_ir as ir

    graph = model.graph
    seen: set[str] = set()
    nbytes = {"compressed_initializer_bytes": 0, "compressed_float32_bytes": 0}
    for node in list(graph):
        if node.domain != MARKER_DOMAIN or node.op_type != MARKER_OP:
            continue
        name = node.attributes["layer"].value
        if name not in layers:
            raise OnnxExportError(f"layer {name}: marked in the graph but not among the compressed layers")
        if name in seen:
            raise OnnxExportError(f"layer {name}: traced twice; the graph would hold its weights twice")
        seen.add(name)
        spec = layers[name]
        x, w = node.inputs[0], node.inputs[1]
        bias = node.inputs[2] if len(node.inputs) > 2 else None

        def init(suffix: str, array, _name=name) -> "ir.Value":
            value = ir.Value(name=f"{_name}.{suffix}", const_value=ir.tensor(array, name=f"{_name}.{suffix}"))
            graph.register_initializer(value)
            nbytes["compressed_initializer_bytes"] += value.const_value.nbytes
            return value

        new_nodes, result = quant_linear_nodes(name, x, spec, onnx_quant, accuracy_level, init)
        if bias is not None:
            add = ir.node("Add", [result, bias], name=f"{name}/Add")
            new_nodes.append(add)
            result = add.outputs[0]
        result.shape, result.type = node.outputs[0].shape, node.outputs[0].type
        ir.convenience.replace_nodes_and_values(graph, node, [node], new_nodes, [node.outputs[0]], [result])
        nbytes["compressed_float32_bytes"] += 4 * spec["codes"].numel()
        if w.is_initializer() and not w.uses():
            graph.initializers.pop(w.name)
    missing = sorted(set(layers) - seen)
    if missing:
        raise OnnxExportError(f"layer {missing[0]}: compressed but not found in the traced graph ({len(missing)} such layers)")
    model.opset_imports.pop(MARKER_DOMAIN, None)
    if onnx_quant == "matmulnbits":
        model.opset_imports["com.microsoft"] = 1
    if onnx_quant == "qdq" and model.opset_imports.get("", 0) < 21:
        model.opset_imports[""] = 21
    return nbytes


def default_accuracy_level(src: str | os.PathLike) -> tuple[int, str]:
    """The MatMulNBits accuracy_level of ``--accuracy-level auto`` for the compress output ``src``, and why.

    Level 4 quantizes the activations to int8 per block of the weight; SmolLM2's norm outputs have outlier channels
    that coarsen their whole block, so its unsmoothed 2:4 + int4 model lands 3.8e-2 (relative norm of the logits)
    from torch at level 4, 1.8e-6 at level 1; smoothed (``--smooth-alpha``, compress's default with 4-bit on
    Llama-style models) it stays at 1.46e-2 at level 4 with blocks of `INT8_BLOCK` (ADMM weights;
    ``benchmarks/results/onnx_default_level*.log``, ``onnx_smoothing.md``). So: 4 when the model was smoothed, else 1.
    """
    report = Path(src) / REPORT_FILE
    try:
        smoothing = json.loads(report.read_text()).get("smoothing") if report.is_file() else None
    except (OSError, ValueError):
        smoothing = None
    alpha = (smoothing or {}).get("alpha") or 0
    if alpha:
        return 4, f"smoothed (smooth_alpha {alpha:g} in {REPORT_FILE}): int8 activations per {INT8_BLOCK} columns"
    return 1, f"not smoothed ({REPORT_FILE} has no smoothing): float compute, int8 activations would cost accuracy"


def set_accuracy_level(proto, level: int) -> int:
    """Set ``accuracy_level`` on every MatMulNBits node of an ``onnx.ModelProto`` in place (e.g. to compare levels
    without exporting again); returns how many nodes were changed."""
    changed = 0
    for node in proto.graph.node:
        if node.op_type == "MatMulNBits" and node.domain == "com.microsoft":
            for attr in node.attribute:
                if attr.name == "accuracy_level":
                    attr.i = int(level)
                    changed += 1
    return changed


# ---------------------------------------------------------------------------------------------- export
def _sample_inputs(model: nn.Module, vocab: int) -> dict[str, Any]:
    """Batch 2, 3 new tokens after 5 cached ones: distinct sizes, so every axis stays its own dynamic dimension."""
    from transformers import DynamicCache

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (2, 8), generator=g)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        cache = model(input_ids=ids[:, :5], use_cache=True, past_key_values=cache).past_key_values
    return {"input_ids": ids[:, 5:], "attention_mask": torch.ones(2, 8, dtype=torch.long),
            "position_ids": torch.arange(5, 8).expand(2, 3).contiguous(), "past_key_values": cache, "use_cache": True}


def _build_gqa(model, layers: dict[str, dict], onnx_quant: str, accuracy_level: int, opset: Optional[int]):
    """The ``gqa`` graph (`converters.onnx_gqa`), its 4-bit layers from ``layers``; returns (model, byte counts).

    Linear layers that read the same input (q/k/v, gate/up) and are all 4-bit with the same block size and zero
    point choice, or all float, are packed into one MatMulNBits (rows stacked: codes and scales unchanged) or one
    MatMul, and split after it (the packed q/k/v goes into GroupQueryAttention unsplit): fewer, larger matmuls and
    fewer nodes per decode step."""
    linears = _GqaLinears(layers, onnx_quant, accuracy_level)
    program = onnx_gqa.build(model, linears, opset=max(opset or 21, 21 if onnx_quant == "qdq" else 17))
    missing = sorted(set(layers) - linears.written)
    if missing:
        raise OnnxExportError(f"layer {missing[0]}: compressed but not part of the gqa graph ({len(missing)} such layers)")
    return program, linears.nbytes


class _GqaLinears:
    """The gqa builder's ``linear(g, items, x, split)``: the nodes of one linear layer, or of layers sharing an
    input packed into one; it counts the bytes written and remembers which layers it wrote."""

    def __init__(self, layers: dict[str, dict], onnx_quant: str, accuracy_level: int):
        self.layers, self.onnx_quant, self.accuracy_level = layers, onnx_quant, accuracy_level
        self.nbytes = {"compressed_initializer_bytes": 0, "compressed_float32_bytes": 0}
        self.written: set[str] = set()

    def __call__(self, g, items: list, x, split: bool = True) -> list:
        names = [n for n, _ in items]
        quantized = [n in self.layers for n in names]
        packed = self._packing(names, quantized) if len(items) > 1 else None
        if packed is None and len(items) > 1:  # mixed kinds or block sizes: one matmul per layer
            return [y for item in items for y in self(g, [item], x)]
        label = names[0] if len(items) == 1 else names[0].rsplit(".", 1)[0] + "." + "_".join(
            n.rsplit(".", 1)[1].removesuffix("_proj") for n in names) + "_proj"
        if packed == "float" or not quantized[0]:
            w = np.concatenate([m.weight.detach().float().t().numpy() for _, m in items], axis=1)
            y = g.op("MatMul", [x, g.initializer(f"{label}.weight_t", np.ascontiguousarray(w))], f"{label}/MatMul")
        else:
            y = self._quantized(g, label, names, packed, x)
        outputs = [int(m.weight.shape[0]) for _, m in items]
        biases = [getattr(m, "bias", None) for _, m in items]
        if any(b is not None for b in biases):
            b = np.concatenate([(b.detach().float().numpy() if b is not None else np.zeros(o, np.float32))
                                for b, o in zip(biases, outputs)])
            y = g.op("Add", [y, g.initializer(f"{label}.bias", b)], f"{label}/Add")
        self.written.update(names)
        if len(items) == 1 or not split:
            return [y]
        sizes = g.const(f"{label}.split", np.array(outputs, np.int64))
        return g.op("Split", [y, sizes], f"{label}/Split", num_outputs=len(items), axis=-1)

    def _tensors(self, name: str):
        spec = self.layers[name]
        return matmulnbits_tensors(name, spec["codes"], spec["scales"], spec["zeros"], spec["group_size"],
                                   self.accuracy_level)

    def _packing(self, names: list[str], quantized: list[bool]):
        """How several layers go into one matmul: their MatMulNBits tensors, ``"float"``, or None (they cannot)."""
        if all(quantized) and self.onnx_quant == "matmulnbits":
            parts = [self._tensors(n) for n in names]
            if all(a == parts[0][1] | {"N": a["N"]} and t.keys() == parts[0][0].keys() for t, a in parts):
                return parts
            return None
        return "float" if not any(quantized) else None

    def _init(self, g, name: str, array):
        value = g.initializer(name, array)
        self.nbytes["compressed_initializer_bytes"] += value.const_value.nbytes
        return value

    def _quantized(self, g, label: str, names: list[str], packed, x):
        """One layer's quantized nodes, or several layers' rows stacked into one MatMulNBits."""
        import onnx_ir as ir

        init = lambda suffix, array: self._init(g, f"{label}.{suffix}", array)  # noqa: E731
        if packed is None:
            nodes, y = quant_linear_nodes(label, x, self.layers[label], self.onnx_quant, self.accuracy_level, init)
        else:
            t = {k: np.concatenate([p[0][k] for p in packed], axis=0) for k in packed[0][0]}
            attrs = packed[0][1] | {"N": sum(int(p[1]["N"]) for p in packed), "accuracy_level": int(self.accuracy_level)}
            inputs = [x, init("qweight", t["B"]), init("scales", t["scales"])]
            if "zero_points" in t:
                inputs.append(init("zero_points", t["zero_points"]))
            nodes = [ir.node("MatMulNBits", inputs, attributes=attrs, domain="com.microsoft",
                             name=f"{label}/MatMulNBits")]
            y = nodes[0].outputs[0]
        for node in nodes:
            for j, out in enumerate(node.outputs):
                out.name = f"{node.name}_out{j}"
        g.nodes.extend(nodes)
        self.nbytes["compressed_float32_bytes"] += sum(4 * self.layers[n]["codes"].numel() for n in names)
        return y


_CACHE_NAME = re.compile(r"^(?:input\.|output\.)?(?:past_key_values|cache|present)\.layers\.(\d+)\.(keys|values)$")


def _canonical_io_names(program) -> None:
    """Give the traced graph's cache inputs and outputs the names the runner and the gqa graph use
    (``input.past_key_values.layers.<i>.<kind>`` / ``output.past_key_values...``), whatever the transformers
    release called them (5.24 names them ``past_key_values.layers...`` and ``cache.layers...``)."""
    for values, side in ((program.graph.inputs, "input"), (program.graph.outputs, "output")):
        for value in values:
            hit = _CACHE_NAME.match(value.name or "")
            if hit:
                value.name = f"{side}.past_key_values.layers.{hit.group(1)}.{hit.group(2)}"


def _trace(model, layers: dict[str, dict], hf_config: dict, conv1d, onnx_quant: str, accuracy_level: int,
           opset: Optional[int], ort_fusions: Optional[str]):
    """The ``traced`` graph: transformers' ONNX exporter with marker ops, lowered; returns (model, byte counts)."""
    try:
        from transformers.exporters import OnnxConfig, OnnxExporter
        from transformers.exporters.exporter_dynamo import get_auto_dynamic_shapes
    except ImportError as e:
        import transformers

        raise OnnxExportError(
            f"the traced ONNX graph needs transformers' ONNX exporter (transformers.exporters, transformers 5.13 on), "
            f"which transformers {transformers.__version__} lacks ({e}); upgrade transformers, or for a Llama, Qwen2 "
            "or Mistral-style model export with --onnx-graph gqa") from None

    if layers:
        _marker_op()
    for name in layers:
        mod = model.get_submodule(name)
        w = mod.weight.t() if name in conv1d else mod.weight
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, _Marked(name, w, mod.bias))

    sample = _sample_inputs(model, hf_config.get("vocab_size") or model.config.vocab_size)
    auto = torch.export.Dim.AUTO

    def batch_and_length(spec):  # per cache tensor [batch, heads, length, head_dim]: only batch and length vary
        if isinstance(spec, dict):
            return {k: v for k, v in spec.items() if k in (0, 2)}
        return type(spec)(batch_and_length(s) for s in spec) if isinstance(spec, (list, tuple)) else spec

    dynamic_shapes = {  # batch, sequence and past length vary; heads and head size stay fixed
        "input_ids": {0: auto, 1: auto}, "attention_mask": {0: auto, 1: auto}, "position_ids": {0: auto, 1: auto},
        "past_key_values": batch_and_length(get_auto_dynamic_shapes(sample["past_key_values"])),
    }
    fusions = {"ort_fusions": ort_fusions} if ort_fusions else {}  # (transformers >= 5.23 only: `_check_fusions`)
    with _translation_installed(), torch.no_grad():
        exported = OnnxExporter().export(
            model, sample, OnnxConfig(dynamic=True, dynamic_shapes=dynamic_shapes, opset_version=opset, **fusions))
    # an onnx_ir model: `.program` from transformers 5.23 on; before, torch's ONNXProgram, whose `.model` it is
    program = exported.program if hasattr(exported, "program") else exported.model
    _canonical_io_names(program)
    nbytes = {"compressed_initializer_bytes": 0, "compressed_float32_bytes": 0}
    if layers:
        nbytes = _lower_markers(program, layers, onnx_quant, accuracy_level)
    return program, nbytes


def export(src: str | os.PathLike, out: str | os.PathLike, dtype: Any = None, overwrite: bool = False,
           onnx_quant: str = "matmulnbits", accuracy_level: int | str = "auto", opset: Optional[int] = None,
           ort_fusions: Optional[str] = None, onnx_graph: str = "auto") -> Path:
    """Write the compress output ``src`` to ``out`` as an ONNX generation graph (see the module docstring).

    ``dtype`` is accepted for the CLI's sake: the graph is float32 (CPU serving); anything else is refused.
    ``ort_fusions="cpu"``: transformers' ONNX Runtime fusions (RMSNorm, rotary, attention over the cache into
    ONNX Runtime's own ops); the graph then runs on ONNX Runtime only.
    """
    import onnx_ir as ir
    from transformers import AutoModelForCausalLM

    src = Path(src)
    _check_options(onnx_graph, onnx_quant, dtype, accuracy_level)
    _check_fusions(ort_fusions, onnx_graph)
    level_choice = "given"
    if accuracy_level == "auto":
        accuracy_level, level_choice = default_accuracy_level(src)
    hf_config = read_config(src)
    records = load_records(src)
    conv1d = conv1d_modules(src, list(records))
    layers = _quantized_layers(src, records, conv1d, onnx_quant)
    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
    model.config.use_cache = True
    onnx_graph = _graph_kind(src, model, onnx_graph, onnx_quant, ort_fusions)
    if onnx_graph == "gqa":
        program, nbytes = _build_gqa(model, layers, onnx_quant, accuracy_level, opset)
    else:
        program, nbytes = _trace(model, layers, hf_config, conv1d, onnx_quant, accuracy_level, opset, ort_fusions)
    leftover = [n.name for n in program.graph if n.domain == MARKER_DOMAIN]
    if leftover:
        raise OnnxExportError(f"the graph still holds {len(leftover)} marker nodes ({leftover[0]})")
    meta = _metadata(src, records, layers, onnx_quant, onnx_graph, ort_fusions, accuracy_level, level_choice)
    for key, value in meta.items():
        program.metadata_props[META_PREFIX + key] = json.dumps(value)
    weights = sum(v.const_value.nbytes for v in program.graph.initializers.values() if v.const_value is not None)
    sidecar = {
        "format": FORMAT, "format_version": 1, "file": MODEL_FILE,
        "external_data": DATA_FILE if weights > EXTERNAL_DATA_BYTES else None,
        "inputs": [v.name for v in program.graph.inputs], "outputs": [v.name for v in program.graph.outputs],
        "num_layers": sum(1 for v in program.graph.inputs if v.name.endswith(".keys")),
        "initializer_bytes": weights, **nbytes,
        **{k: meta[k] for k in ("onnx_quant", "onnx_graph", "positions", "ort_fusions", "accuracy_level",
                                "accuracy_level_choice", "pattern",
                                "sparsity", "bits")},
    }
    with atomic_dir(out, overwrite) as tmp:
        ir.save(program, str(tmp / MODEL_FILE), external_data=sidecar["external_data"])
        cfg = dict(hf_config)
        cfg.pop("quantization_config", None)
        cfg["dtype"] = "float32"
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        copy_side_files(src, tmp)
        (tmp / SIDECAR).write_text(json.dumps(sidecar, indent=1) + "\n")
    return Path(out)


def _check_options(onnx_graph: str, onnx_quant: str, dtype: Any, accuracy_level: Any) -> None:
    if onnx_graph not in ONNX_GRAPH:
        raise OnnxExportError(f"--onnx-graph {onnx_graph!r}: choose one of {', '.join(ONNX_GRAPH)}")
    if onnx_quant not in ONNX_QUANT:
        raise OnnxExportError(f"--onnx-quant {onnx_quant!r}: choose one of {', '.join(ONNX_QUANT)}")
    if dtype not in (None, "float32", torch.float32):
        raise OnnxExportError(f"--dtype {dtype}: the ONNX export writes a float32 graph (its 4-bit layers stay 4-bit)")
    if accuracy_level != "auto" and (not isinstance(accuracy_level, int) or accuracy_level not in (0, 1, 2, 3, 4)):
        raise OnnxExportError(f"--accuracy-level {accuracy_level!r}: MatMulNBits takes auto, 0, 1, 2, 3 or 4")


def _quantized_layers(src: Path, records: dict, conv1d: set, onnx_quant: str) -> dict[str, dict]:
    """The 4-bit layers' codes, scales and zero points (none with ``--onnx-quant none``), checked."""
    if onnx_quant == "none":
        return {}
    quantized = {k: r for k, r in records.items() if r.bits}
    if not quantized:
        raise OnnxExportError(
            f"{src}: no quantized layers, so there is nothing for --onnx-quant {onnx_quant} to write; compress "
            "with --bits 4, or export the float graph with --onnx-quant none"
        )
    for name, rec in quantized.items():
        if rec.bits != 4:
            raise OnnxExportError(
                f"layer {name} is {rec.bits}-bit; --onnx-quant {onnx_quant} writes 4-bit layers only: compress "
                "with --bits 4, or export the float graph with --onnx-quant none"
            )
    tensors = read_checkpoint(src)
    layers: dict[str, dict] = {}
    for name, rec in quantized.items():
        w = tensors.get(f"{name}.weight")
        if w is None:
            raise OnnxExportError(f"{src}: {name}.weight is missing from the checkpoint")
        w = w.t() if name in conv1d else w
        if tuple(w.shape) != tuple(rec.shape):
            raise OnnxExportError(f"layer {name}: weight of shape {tuple(w.shape)}, but the record says {tuple(rec.shape)}")
        layers[name] = {"codes": weight_codes(name, rec, w), "scales": rec.scales,
                        "zeros": None if rec.sym else rec.zeros, "group_size": rec.group_size}
    return layers


def exporter_takes_fusions() -> bool:
    """Whether transformers' ONNX exporter takes ONNX Runtime fusions (``OnnxConfig(ort_fusions=...)``, 5.23 on)."""
    import inspect

    try:
        from transformers.exporters import OnnxConfig
    except ImportError:  # no ONNX exporter at all (before transformers 5.13)
        return False
    return "ort_fusions" in inspect.signature(OnnxConfig.__init__).parameters


def _check_fusions(ort_fusions: Optional[str], onnx_graph: str) -> None:
    """``--ort-fusions`` refused before any work where the exporter does not take them (with ``--onnx-graph gqa``
    `_graph_kind` refuses the pair itself)."""
    if not ort_fusions or onnx_graph == "gqa" or exporter_takes_fusions():
        return
    import transformers

    raise OnnxExportError(f"--ort-fusions {ort_fusions}: transformers {transformers.__version__}'s ONNX exporter has no "
                          "ONNX Runtime fusions (they came in transformers 5.23); upgrade transformers or drop "
                          "--ort-fusions")


def _graph_kind(src: Path, model, onnx_graph: str, onnx_quant: str, ort_fusions: Optional[str]) -> str:
    """``gqa`` or ``traced``: ``auto`` resolved, impossible requests refused."""
    reason = onnx_gqa.unsupported(model)
    if onnx_graph == "gqa" and reason:
        raise OnnxExportError(f"--onnx-graph gqa: {src} has {reason}; export it with --onnx-graph traced")
    if onnx_graph == "gqa" and ort_fusions:
        raise OnnxExportError("--ort-fusions applies to the traced graph; the gqa graph is already written with "
                              "ONNX Runtime's fused operators (drop --ort-fusions or use --onnx-graph traced)")
    if onnx_graph == "auto":  # the portable qdq graph and the traced fusions keep the traced graph
        onnx_graph = "traced" if reason or onnx_quant == "qdq" or ort_fusions else "gqa"
    return onnx_graph


def _metadata(src: Path, records: dict, layers: dict, onnx_quant: str, onnx_graph: str, ort_fusions, accuracy_level,
              level_choice: str) -> dict:
    """The graph's metadata properties (``META_PREFIX`` + key)."""
    sg_config = load_config(src)
    patterns = sorted({r.pattern for r in records.values()})
    numel = sum(r.shape[0] * r.shape[1] for r in records.values() if r.pattern != "dense") or 1
    return {
        "onnx_quant": onnx_quant,
        "onnx_graph": onnx_graph,
        # the gqa graph rotates inside GroupQueryAttention, which takes a prompt's positions from the cache length
        # (0, 1, ... whatever the padding) and only later steps' from position_ids: runners feed every row's
        # absolute index, the same relative positions as transformers' for left-padded rows
        "positions": "absolute" if onnx_graph == "gqa" else "position_ids",
        "ort_fusions": ort_fusions,
        "accuracy_level": accuracy_level if onnx_quant == "matmulnbits" else None,
        "accuracy_level_choice": level_choice if onnx_quant == "matmulnbits" else None,
        "pattern": patterns[0] if len(patterns) == 1 else patterns,
        "sparsity": round(sum(r.sparsity * r.shape[0] * r.shape[1] for r in records.values() if r.pattern != "dense") / numel, 6),
        "bits": sorted({r.bits for r in records.values() if r.bits}) or None,
        "layers": {k: {"pattern": r.pattern, "sparsity": round(r.sparsity, 6), "bits": r.bits,
                       "group_size": r.group_size, "sym": r.sym,
                       "onnx": ("MatMulNBits" if onnx_quant == "matmulnbits" else "DequantizeLinear+MatMul")
                       if k in layers else "MatMul (float32)"}
                   for k, r in records.items()},
        "config": sg_config.to_dict() if sg_config else None,
    }
