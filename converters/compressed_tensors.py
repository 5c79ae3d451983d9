"""``compressed-tensors``: W4A16 ``pack-quantized`` checkpoints for vLLM and transformers.

Written with the ``compressed-tensors`` library: its ``pack_to_int32`` packs our own int4 codes (eight per
int32 along the input dimension) and its ``ModelCompressor`` writes ``quantization_config``; nothing is
quantized again, so the loaded weights are the compress output's, bit for bit in float16. Per compressed
layer: ``weight_packed`` int32 [out, in/8], ``weight_scale`` [out, groups] and ``weight_shape`` int64 [2].

What the format cannot say, and what we do about it:
- sparsity: ``"sparsity_config": {}`` (a non-empty one breaks current vLLM); the pattern and the measured
  sparsity go to the sidecar ``sparsity.json``. The zeros are stored as codes like any other value.
- asymmetric grids: refused. The format defines packed zero points, but transformers 5 cannot load them
  (it expects ``weight_zero_point`` [out, groups] and the packer writes [out/8, groups]).
- a narrower last group (SmolLM2's 576 columns are 4.5 groups of 128): compressed-tensors needs the group
  size to divide every layer's columns, so the groups are written at ``gcd(group_size, every in_features)``
  (64 for SmolLM2) with each scale repeated; the values are unchanged.
- ``weight_scale`` is loaded in the model's dtype: the export dtype must hold the scales exactly (float16
  scales: float16 or float32 exports, not bfloat16).
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Optional

import torch

from sparsegpt_export.io import atomic_dir
from sparsegpt_export.records import load_records

from .dense import cast, copy_side_files, dtype_name, read_checkpoint, read_config, resolve_dtype, write_config
from .common import check_nm, conv1d_modules, parse_nm, weight_codes

FORMAT = "compressed-tensors"
WEIGHTS_FILE = "model.safetensors"
SPARSITY_FILE = "sparsity.json"


def _fail(src, msg: str) -> ValueError:
    return ValueError(f"{src}: cannot export as compressed-tensors W4A16: {msg}")


def export(src: str | os.PathLike, out: str | os.PathLike, dtype: str | torch.dtype | None = None,
           overwrite: bool = False) -> Path:
    """Write the 4-bit symmetric compress output ``src`` to ``out`` as compressed-tensors ``pack-quantized``."""
    from compressed_tensors.compressors import ModelCompressor
    from safetensors.torch import save_file

    src = Path(src)
    config = read_config(src)
    dt = resolve_dtype(config, dtype)
    records = {k: r for k, r in load_records(src).items() if r.bits}
    g, g_out = _check_records(src, records, dt)
    tensors = read_checkpoint(src)
    packed, layers = _pack_layers(src, records, tensors, g, g_out, dt)
    packed.update({k: cast(v, dt) for k, v in tensors.items()})
    qcfg = _quantization_config(records, g_out)
    config.pop("quantization_config", None)
    with atomic_dir(out, overwrite) as tmp:
        save_file(packed, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        write_config(config, tmp, dt)
        ModelCompressor(quantization_config=qcfg).update_config(str(tmp))
        cfg = json.loads((tmp / "config.json").read_text())
        cfg["quantization_config"]["sparsity_config"] = {}
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        (tmp / SPARSITY_FILE).write_text(json.dumps(_sidecar(records, layers, g, g_out), indent=1) + "\n")
        copy_side_files(src, tmp)
    return Path(out)


def _check_records(src: Path, records: dict, dt: torch.dtype) -> tuple[Optional[int], Optional[int]]:
    """What this format can hold, checked layer by layer: ``(group size, group size written)`` (the written one
    divides every layer's columns)."""
    if not records:
        raise _fail(src, "no 4-bit layers (compress with --bits 4)")
    for name, rec in records.items():
        if rec.bits != 4:
            raise _fail(src, f"layer {name} is {rec.bits}-bit; this format is written for 4-bit weights only")
        if not rec.sym:
            raise _fail(src, f"layer {name} has an asymmetric grid; transformers 5 cannot load compressed-tensors' "
                             "packed zero points today, so compress with --sym (or export --format sparse24)")
        if rec.scales.dtype != dt and dt != torch.float32:
            raise _fail(src, f"layer {name}: its {dtype_name(rec.scales.dtype)} scales would be rounded to "
                             f"{dtype_name(dt)} at load (weight_scale takes the model's dtype); export with "
                             f"--dtype {dtype_name(rec.scales.dtype)} or float32")
    conv1d = conv1d_modules(src, list(records))
    if conv1d:
        raise _fail(src, f"layer {sorted(conv1d)[0]} is a Conv1D (GPT-2 style); compressed-tensors quantizes "
                         "nn.Linear modules only: export --format sparse24 or dense")
    groups = {r.group_size for r in records.values()}
    if len(groups) > 1:
        raise _fail(src, f"layers use different group sizes {sorted(groups, key=str)}")
    g = groups.pop()
    cols = [r.shape[1] for r in records.values()]
    return g, (g if g is None or all(c % g == 0 for c in cols) else math.gcd(g, *cols))


def _pack_layers(src: Path, records: dict, tensors: dict, g, g_out, dt) -> tuple[dict, dict]:
    """Each layer's packed int4 codes, scales, shape (and bias), popped from ``tensors``; and its sidecar entry."""
    from compressed_tensors.compressors.pack_quantized import pack_to_int32

    packed: dict[str, torch.Tensor] = {}
    layers = {}
    for name, rec in records.items():
        w = tensors.pop(f"{name}.weight", None)
        if w is None:
            raise _fail(src, f"{name}.weight is missing from the checkpoint")
        if tuple(w.shape) != tuple(rec.shape):
            raise _fail(src, f"layer {name}: weight of shape {tuple(w.shape)}, but the record says {tuple(rec.shape)}")
        rows, c = rec.shape
        nm = parse_nm(rec.pattern)
        if nm:
            check_nm(name, (w != 0).reshape(rows, c // nm[1], nm[1]), *nm)
        codes = weight_codes(name, rec, w)  # checked to give back every weight exactly
        scales = rec.scales
        if g_out != g:
            scales = scales.repeat_interleave(g // g_out, dim=1)[:, : c // g_out]
        packed[f"{name}.weight_packed"] = pack_to_int32((codes.to(torch.int16) - 8).to(torch.int8), 4).contiguous()
        packed[f"{name}.weight_scale"] = scales.contiguous()
        packed[f"{name}.weight_shape"] = torch.tensor([rows, c], dtype=torch.int64)
        if f"{name}.bias" in tensors:
            packed[f"{name}.bias"] = cast(tensors.pop(f"{name}.bias"), dt)
        layers[name] = {"pattern": rec.pattern, "sparsity": round(rec.sparsity, 6),
                        "zero_fraction": round(float((w == 0).float().mean()), 6)}
    return packed, layers


def _quantization_config(records: dict, g_out):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    weights = QuantizationArgs(num_bits=4, type="int", symmetric=True, dynamic=False,
                               **({"strategy": "group", "group_size": g_out} if g_out else {"strategy": "channel"}))
    targets = ["re:^(" + "|".join(n.replace(".", r"\.") for n in sorted(records)) + ")$"]
    return QuantizationConfig(config_groups={"group_0": QuantizationScheme(targets=targets, weights=weights)},
                              format="pack-quantized", quantization_status="compressed",
                              ignore=[] if "lm_head" in records else ["lm_head"])  # --quantize-lm-head: W4A16 too


def _sidecar(records: dict, layers: dict, g, g_out) -> dict:
    numel = sum(r.shape[0] * r.shape[1] for r in records.values())
    pruned = sum(r.sparsity * r.shape[0] * r.shape[1] for r in records.values())
    zeros = sum(layers[n]["zero_fraction"] * r.shape[0] * r.shape[1] for n, r in records.items())
    patterns = sorted({r.pattern for r in records.values()})
    return {
        "pattern": patterns[0] if len(patterns) == 1 else patterns, "sparsity": round(pruned / numel, 6),
        "zero_fraction": round(zeros / numel, 6),
        "bits": 4, "group_size": g, "group_size_written": g_out, "sym": True, "layers": layers,
        "note": "sparsity: the share of weights pruned by the pattern; zero_fraction: also the kept weights that "
                "quantized to 0. The sparsity is not declared in quantization_config.sparsity_config (a non-empty one breaks "
                "current vLLM); the zeros are stored as int4 codes",
    }
