"""``sparse24``: our own compact, versioned format for N:M (and unstructured) sparse, quantized weights.

One safetensors file, ``model.sparse24.safetensors``, and a ``config.json`` whose ``quantization_config``
(``quant_method: sparsegpt, format: sparse24, format_version: 1``) records every compressed layer. Per layer
``<module>`` (weights as [out, in]; GPT-2's Conv1D is transposed to that and back, ``"transposed": true``):

- N:M, quantized:   ``.codes``     uint8 [out, ceil(K*bits/8)]: the N kept codes of every group of M inputs,
                                   K = in/M*N per row, as a little-endian bit stream per row (4 bits: two codes a
                                   byte, the first in the low nibble);
                    ``.positions`` uint8 [out, ceil(K*p/8)]: the index 0..M-1 of each kept slot in its group,
                                   ascending, p = ceil(log2 M) bits each (2 for 2:4, 3 for 4:8), packed the same way;
                    ``.scales``    [out, ngroups] as in the compress sidecar (float16), ``.zeros`` uint8 (asym only).
                    A group with fewer than N nonzeros fills its free slots with unused positions and the zero
                    point (value 0). value = scale * (code - zero); symmetric grids have zero = 2^(bits-1).
- N:M, unquantized: ``.values`` [out, K] in the export dtype and ``.positions`` as above; except 2:4 in
                    float16/bfloat16 with out % 32 == 0 and in % 64 == 0 (``"layout": "cutlass"``): ``.values``
                    [out, in/2] and ``.meta`` int16 [out, in/16] exactly as PyTorch's CUTLASS semi-structured tensor
                    holds them (``sparse_semi_structured_from_dense_cutlass``), so a CUDA load is a copy.
- unstructured:     ``.bitmask`` uint8 [out, ceil(in/8)], ``np.packbits`` of each row's nonzeros (row-major,
                    big-endian bit order as numpy's default), and ``.values`` [nnz] in the export dtype, or
                    ``.codes`` (the nonzeros' codes as one packed bit stream) with ``.scales``/``.zeros``.
- dense, quantized: ``.codes`` [out, ceil(in*bits/8)] with ``.scales``/``.zeros``.

Every other tensor (embeddings, norms, lm_head, biases, skipped layers) is stored under its own name in the
export dtype; tied weights are stored once, as in the source checkpoint.

Codes are recovered from the compress output as ``round(w/scale) + zero`` and checked to give back every
weight bit for bit, so ``load_state_dict`` returns exactly the compress output's weights cast to the export
dtype (quantized values are decoded in float32, rounded to the source dtype, then to the export dtype, the
same path the compress output took). Each layer's record in ``quantization_config.layers`` holds what is
needed to allocate its tensors before reading them (`layer_tensor_specs`): shape, pattern, bits, group size,
``scale_dtype``, ``nnz`` (unstructured) and ``layout``. The weights file is listed in
``model.safetensors.index.json`` so that transformers finds it (with ``import sparsegpt_export``, which
registers the loader; see ``sparsegpt_export.integrations.transformers``).
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from sparsegpt_export.io import atomic_dir
from sparsegpt_export.records import LayerRecord, load_config, load_records
from sparsegpt_export.solver import expand_groups

from .common import check_nm, conv1d_modules, grid, parse_nm, weight_codes

from .dense import (cast, copy_side_files, dtype_name, read_checkpoint, read_config, read_safetensors,
                    resolve_dtype, write_config)

FORMAT = "sparse24"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.sparse24.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PACKED_SUFFIXES = ("codes", "positions", "scales", "zeros", "values", "bitmask", "meta")
_CUTLASS_DTYPES = (torch.float16, torch.bfloat16)


# ---------------------------------------------------------------------------------------------- bit packing
def pack_bits(x: torch.Tensor, bits: int) -> torch.Tensor:
    """[rows, k] integers < 2^bits -> [rows, ceil(k*bits/8)] uint8: per row one little-endian bit stream."""
    a = x.to(torch.uint8).contiguous().numpy()
    rows, k = a.shape
    stream = np.unpackbits(a[..., None], axis=-1, bitorder="little")[..., :bits].reshape(rows, k * bits)
    return torch.from_numpy(np.packbits(stream, axis=-1, bitorder="little"))


def unpack_bits(p: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Inverse of `pack_bits`: [rows, ceil(k*bits/8)] uint8 -> [rows, k] uint8."""
    a = p.contiguous().numpy()
    stream = np.unpackbits(a, axis=-1, count=k * bits, bitorder="little").reshape(a.shape[0], k, bits)
    return torch.from_numpy(np.packbits(stream, axis=-1, bitorder="little")[..., 0])


def position_bits(m: int) -> int:
    return max(1, math.ceil(math.log2(m)))


def _packed_bytes(nbits: int) -> int:
    return (nbits + 7) // 8


def _dequant(name: str, meta: dict, codes: torch.Tensor, scales: torch.Tensor,
             zeros: Optional[torch.Tensor]) -> torch.Tensor:
    """Codes [out, in] -> values in the source dtype (the exact compress output)."""
    s, z = grid(name, tuple(meta["shape"]), meta["bits"], meta["group_size"], scales, zeros)
    return (s * (codes.float() - z)).to(getattr(torch, meta["source_dtype"]))


# ---------------------------------------------------------------------------------------------- packing
def _kept_positions(nz: torch.Tensor, n: int) -> torch.Tensor:
    """[out, groups, m] bool -> [out, groups, n] ascending slot indices: the nonzeros, then the first free slots."""
    m = nz.shape[-1]
    key = (~nz).long() * m + torch.arange(m)
    return key.argsort(dim=-1)[..., :n].sort(dim=-1).values


def uses_cutlass_layout(pattern: str, bits: Optional[int], shape, dtype: torch.dtype) -> bool:
    """Unquantized 2:4 in float16/bfloat16 with shapes CUTLASS takes: stored in its own layout."""
    rows, cols = shape
    return pattern == "2:4" and not bits and dtype in _CUTLASS_DTYPES and rows % 32 == 0 and cols % 64 == 0


def pack_layer(name: str, rec: LayerRecord, w: torch.Tensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The tensors of one compressed layer ``w`` [out, in] (in its source dtype), keyed by suffix."""
    rows, cols = rec.shape
    out: dict[str, torch.Tensor] = {}
    nm = parse_nm(rec.pattern)
    if nm:  # the pattern first: a broken pattern is the likelier (and clearer) error
        n, m = nm
        if cols % m:
            raise ValueError(f"layer {name}: {cols} input columns are not a multiple of M={m} ({rec.pattern})")
        nz = (w != 0).reshape(rows, cols // m, m)
        check_nm(name, nz, n, m)
    codes = weight_codes(name, rec, w) if rec.bits else None
    if rec.bits:
        out["scales"] = rec.scales.contiguous()
        if not rec.sym:
            out["zeros"] = rec.zeros.to(torch.uint8).contiguous()
    if uses_cutlass_layout(rec.pattern, rec.bits, rec.shape, dtype):
        from torch.sparse._semi_structured_conversions import sparse_semi_structured_from_dense_cutlass

        out["values"], out["meta"] = (t.contiguous() for t in sparse_semi_structured_from_dense_cutlass(w.to(dtype)))
    elif nm:
        pos = _kept_positions(nz, n)
        out["positions"] = pack_bits(pos.reshape(rows, -1), position_bits(m))
        if codes is not None:
            out["codes"] = pack_bits(codes.reshape(rows, -1, m).gather(-1, pos).reshape(rows, -1), rec.bits)
        else:
            out["values"] = w.reshape(rows, -1, m).gather(-1, pos).reshape(rows, -1).to(dtype).contiguous()
    elif rec.pattern == "unstructured":
        nz = w != 0
        out["bitmask"] = torch.from_numpy(np.packbits(nz.numpy(), axis=1))
        if codes is not None:
            out["codes"] = pack_bits(codes[nz][None], rec.bits)[0]
        else:
            out["values"] = w[nz].to(dtype).contiguous()
    elif rec.pattern == "dense" and codes is not None:
        out["codes"] = pack_bits(codes, rec.bits)
    elif rec.pattern == "dense":
        out["weight"] = w.to(dtype).contiguous()
    else:
        raise ValueError(f"layer {name}: unknown pattern {rec.pattern!r}")
    return out


def export(src: str | os.PathLike, out: str | os.PathLike, dtype: str | torch.dtype | None = None,
           overwrite: bool = False) -> Path:
    """Write the compress output ``src`` to ``out`` in the sparse24 format (other tensors in ``dtype``)."""
    from safetensors.torch import save_file

    src = Path(src)
    config = read_config(src)
    dt = resolve_dtype(config, dtype)
    records = load_records(src)
    tensors = read_checkpoint(src)
    transposed = conv1d_modules(src, list(records))
    packed: dict[str, torch.Tensor] = {}
    layers: dict[str, dict[str, Any]] = {}
    for name, rec in records.items():
        w = tensors.pop(f"{name}.weight", None)
        if w is None:
            raise ValueError(f"layer {name}: {name}.weight is missing from the checkpoint in {src}")
        w = w.t() if name in transposed else w
        if tuple(w.shape) != tuple(rec.shape):
            raise ValueError(f"layer {name}: weight of shape {tuple(w.shape)}, but the record says {tuple(rec.shape)}")
        packed.update({f"{name}.{k}": v for k, v in pack_layer(name, rec, w, dt).items()})
        layers[name] = {
            "pattern": rec.pattern, "bits": rec.bits, "group_size": rec.group_size, "sym": rec.sym,
            "shape": list(rec.shape), "transposed": name in transposed, "source_dtype": dtype_name(w.dtype),
            "layout": "cutlass" if uses_cutlass_layout(rec.pattern, rec.bits, rec.shape, dt) else "packed",
        }
        if rec.bits:
            layers[name]["scale_dtype"] = dtype_name(rec.scales.dtype)
        if rec.pattern == "unstructured":
            layers[name]["nnz"] = int((w != 0).sum())
    clash = sorted(set(packed) & set(tensors))
    if clash:
        raise ValueError(f"{src}: tensor names {clash[:3]} clash with the sparse24 layer tensors")
    packed.update({k: cast(v, dt) for k, v in tensors.items()})

    cfg = load_config(src)
    first = next(iter(records.values()), None)
    config["quantization_config"] = {
        "quant_method": "sparsegpt", "format": FORMAT, "format_version": FORMAT_VERSION, "dtype": dtype_name(dt),
        "pattern": cfg.pattern if cfg else (first.pattern if first else None),
        "bits": cfg.bits if cfg else (first.bits if first else None),
        "group_size": cfg.group_size if cfg else (first.group_size if first else None),
        "sym": cfg.sym if cfg else (first.sym if first else True),
        "layers": layers,
    }
    dense = fused_expert_notes(src)
    if dense:
        config["quantization_config"]["dense_params"] = dense
    meta = {"format": "pt", "sparsegpt_format": FORMAT, "format_version": str(FORMAT_VERSION)}
    with atomic_dir(out, overwrite) as tmp:
        save_file(packed, str(tmp / WEIGHTS_FILE), metadata=meta)
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in packed.values()),
                              "sparsegpt_format": FORMAT},
                 "weight_map": {k: WEIGHTS_FILE for k in sorted(packed)}}
        (tmp / INDEX_FILE).write_text(json.dumps(index, indent=1) + "\n")
        config["quantization_config"]["sha256"] = {WEIGHTS_FILE: file_sha256(tmp / WEIGHTS_FILE)}
        write_config(config, tmp, dt)
        copy_side_files(src, tmp)
    return Path(out)


def fused_expert_notes(src: str | os.PathLike) -> dict[str, str]:
    """Per fused 3-D expert parameter of the compress output, why sparse24 stores it dense."""
    params: dict[str, list[LayerRecord]] = {}
    for name, rec in load_records(src, key="experts").items():
        params.setdefault(name.rpartition(".")[0], []).append(rec)
    notes = {}
    for param, recs in params.items():
        how = sorted({f"{r.pattern}" + (f" + {r.bits}-bit g{r.group_size or 'row'}" if r.bits else "") for r in recs})
        notes[param] = (f"fused 3-D expert parameter ({len(recs)} expert matrices compressed, {', '.join(how)}): "
                        "sparse24 packs 2-D linear layers only, so it is stored dense in the export dtype")
    return notes


# ---------------------------------------------------------------------------------------------- loading
def file_sha256(f: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(f, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_files(folder: Path, qc: dict) -> None:
    """The weights files hash to what the export recorded, else a ValueError naming the file."""
    for name, digest in (qc.get("sha256") or {}).items():
        f = Path(folder) / name
        if f.is_file() and file_sha256(f) != digest:
            raise ValueError(f"{f}: its SHA-256 differs from the one recorded in config.json at export; the file was "
                             "modified or is corrupt")


def read_quant_config(folder: str | os.PathLike) -> dict:
    """The sparse24 ``quantization_config`` of ``folder``, checked for format and version."""
    qc = read_config(folder).get("quantization_config") or {}
    f = Path(folder) / "config.json"
    if qc.get("quant_method") != "sparsegpt" or qc.get("format") != FORMAT:
        raise ValueError(f"{f}: not a sparse24 export (quantization_config format {qc.get('format')!r})")
    version = qc.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION or version < 1:
        raise ValueError(f"{f}: sparse24 format_version {version!r} is not supported "
                         f"(this package reads 1..{FORMAT_VERSION})")
    return qc


def layer_tensor_specs(meta: dict, value_dtype: torch.dtype) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """The stored tensors of one layer record: ``{suffix: (shape, dtype)}``, values in ``value_dtype``."""
    rows, cols = meta["shape"]
    bits, gs, u8 = meta["bits"], meta["group_size"], torch.uint8
    nm = parse_nm(meta["pattern"])
    specs: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    if bits:
        ngroups = -(-cols // (gs or cols))
        specs["scales"] = ((rows, ngroups), resolve_dtype({}, meta.get("scale_dtype", "float16")))
        if not meta["sym"]:
            specs["zeros"] = ((rows, ngroups), u8)
    if meta.get("layout") == "cutlass":
        specs["values"] = ((rows, cols // 2), value_dtype)
        specs["meta"] = ((rows, cols // 16), torch.int16)
    elif nm:
        n, m = nm
        if cols % m:
            raise ValueError(f"recorded shape {(rows, cols)} is not a multiple of M={m}")
        k = cols // m * n
        specs["positions"] = ((rows, _packed_bytes(k * position_bits(m))), u8)
        specs["codes" if bits else "values"] = ((rows, _packed_bytes(k * bits)), u8) if bits else ((rows, k), value_dtype)
    elif meta["pattern"] == "unstructured":
        nnz = int(meta["nnz"])
        specs["bitmask"] = ((rows, _packed_bytes(cols)), u8)
        specs["codes" if bits else "values"] = ((_packed_bytes(nnz * bits),), u8) if bits else ((nnz,), value_dtype)
    elif meta["pattern"] == "dense":
        specs["codes" if bits else "weight"] = ((rows, _packed_bytes(cols * bits)), u8) if bits else ((rows, cols), value_dtype)
    else:
        raise ValueError(f"unknown pattern {meta['pattern']!r}")
    return specs


def unpack_layer(name: str, meta: dict, take: Callable[[str], torch.Tensor]) -> torch.Tensor:
    """The layer's weight [out, in] (not transposed back) from its tensors, ``take(suffix)`` (CPU, checked
    against `layer_tensor_specs`). Quantized layers come back in their source dtype, others as stored."""
    rows, cols = meta["shape"]
    bits, gs = meta["bits"], meta["group_size"]
    nm = parse_nm(meta["pattern"])
    if bits:
        ngroups = -(-cols // (gs or cols))
        scales = take("scales")
        zeros = take("zeros") if not meta["sym"] else None
        z = zeros if zeros is not None else torch.full((rows, ngroups), 2 ** (bits - 1), dtype=torch.uint8)
        codes = expand_groups(z, z, cols, gs)[0].clone()  # every code the zero point (value 0) until filled

        def packed_codes(k: int) -> torch.Tensor:
            t = take("codes")
            return unpack_bits(t if t.dim() == 2 else t[None], bits, k)

    if meta.get("layout") == "cutlass":
        from torch.sparse._semi_structured_conversions import sparse_semi_structured_to_dense_cutlass

        w = sparse_semi_structured_to_dense_cutlass(take("values"), take("meta"))
        if not bool(((w != 0).reshape(rows, -1, 4).sum(-1) <= 2).all()):
            raise ValueError(f"layer {name}: the CUTLASS metadata does not decode to 2:4; the file is corrupt")
    elif nm:
        n, m = nm
        k, pb = cols // m * n, position_bits(m)
        pos = unpack_bits(take("positions"), pb, k).long().reshape(rows, -1, n)
        if (pos >= m).any() or (pos.diff(dim=-1) <= 0).any():
            raise ValueError(f"layer {name}: positions are not ascending indices below {m}; the file is corrupt")
        if bits:
            codes.reshape(rows, -1, m).scatter_(-1, pos, packed_codes(k).reshape(rows, -1, n))
            w = _dequant(name, meta, codes, scales, zeros)
        else:
            vals = take("values")
            w = torch.zeros(rows, cols, dtype=vals.dtype)
            w.reshape(rows, -1, m).scatter_(-1, pos, vals.reshape(rows, -1, n))
    elif meta["pattern"] == "unstructured":
        nz = torch.from_numpy(np.unpackbits(take("bitmask").numpy(), axis=1, count=cols).astype(bool))
        nnz = int(nz.sum())
        if nnz != int(meta["nnz"]):
            raise ValueError(f"layer {name}: the bitmask has {nnz} nonzeros, the record says {meta['nnz']}")
        if bits:
            codes[nz] = packed_codes(nnz)[0]
            w = _dequant(name, meta, codes, scales, zeros)
        else:
            vals = take("values")
            w = torch.zeros(rows, cols, dtype=vals.dtype)
            w[nz] = vals
    elif bits:
        w = _dequant(name, meta, packed_codes(cols), scales, zeros)
    else:
        w = take("weight")
    return w


def checked_tensor(t: Optional[torch.Tensor], name: str, suffix: str, meta: dict, value_dtype: torch.dtype,
                   where: Any) -> torch.Tensor:
    """``t`` (the stored ``<name>.<suffix>``) checked against the layer record, else a ValueError naming both."""
    key = f"{name}.{suffix}"
    if t is None:
        raise ValueError(f"{where}: tensor {key} of layer {name} is missing")
    shape, want = layer_tensor_specs(meta, value_dtype)[suffix]
    if tuple(t.shape) != tuple(shape) or t.dtype != want:
        raise ValueError(f"{where}: layer {name}: {key} has shape {tuple(t.shape)} {dtype_name(t.dtype)}, "
                         f"expected {tuple(shape)} {dtype_name(want)} for the recorded shape {tuple(meta['shape'])}")
    return t


def decode_layer(name: str, meta: dict, take: Callable[[str], torch.Tensor], folder: Any) -> torch.Tensor:
    """`unpack_layer` with malformed records reported as such, transposed back to the checkpoint layout."""
    try:
        w = unpack_layer(name, meta, take)
    except (KeyError, TypeError) as e:
        raise ValueError(f"{Path(folder) / 'config.json'}: layer {name}: malformed layer record ({e!r})") from None
    except ValueError as e:
        msg = str(e)
        raise ValueError(msg if name in msg else f"layer {name}: {msg}") from None
    return w.t().contiguous() if meta.get("transposed") else w


def load_state_dict(folder: str | os.PathLike, dtype: str | torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The dense state dict of a sparse24 export, in the checkpoint's own layout and in ``dtype``
    (default: the export dtype). Everything is read and checked before anything is returned."""
    folder = Path(folder)
    qc = read_quant_config(folder)
    export_dt = resolve_dtype({}, qc.get("dtype", "float16"))
    dt = resolve_dtype({}, dtype) if dtype is not None else export_dt
    f = folder / WEIGHTS_FILE
    tensors, file_meta = read_safetensors(f)
    if int(file_meta.get("format_version", "1")) > FORMAT_VERSION:
        raise ValueError(f"{f}: format_version {file_meta['format_version']} is newer than this package reads "
                         f"({FORMAT_VERSION})")
    state: dict[str, torch.Tensor] = {}
    for name, meta in qc.get("layers", {}).items():
        def take(suffix: str, name: str = name, meta: dict = meta) -> torch.Tensor:
            return checked_tensor(tensors.pop(f"{name}.{suffix}", None), name, suffix, meta, export_dt, f)

        w = decode_layer(name, meta, take, folder)
        state[f"{name}.weight"] = w.to(export_dt).to(dt)  # the same rounding path as the compress output
    left = sorted(k for k in tensors if k.rpartition(".")[0] in qc.get("layers", {})
                  and k.rpartition(".")[2] in PACKED_SUFFIXES + ("weight",))
    if left:
        raise ValueError(f"{f}: unexpected tensors {left[:3]} (not used by their layer's recorded pattern)")
    state.update({k: cast(v, dt) for k, v in tensors.items()})
    verify_files(folder, qc)  # after the structural checks, whose messages say more
    return state


def load_model(folder: str | os.PathLike, dtype: str | torch.dtype | None = None):
    """An ``AutoModelForCausalLM`` (eval mode) with the decompressed weights of a sparse24 export."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    from sparsegpt_export.models import strip_quantization_config

    folder = Path(folder)
    state = load_state_dict(folder, dtype)
    config = AutoConfig.from_pretrained(str(folder))
    strip_quantization_config(config)
    dt = next((v.dtype for v in state.values() if v.is_floating_point()), torch.float32)
    model = AutoModelForCausalLM.from_config(config, dtype=dt)
    expected = model.state_dict()
    # tied weights are stored once: a missing name is fine when it shares its tensor with a loaded one
    loaded_ptrs = {expected[k].data_ptr() for k in state if k in expected}
    missing = [k for k in expected if k not in state and expected[k].data_ptr() not in loaded_ptrs]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in state if k in expected and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        raise ValueError(f"{folder}: the weights do not fit {type(model).__name__}: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}, wrong shape {wrong[:3]}")
    model.load_state_dict(state, strict=False)
    if (folder / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(str(folder))
    return model.eval()


# ---------------------------------------------------------------------------------------------- sizes
def theoretical_bytes(records: dict[str, LayerRecord], value_dtype: torch.dtype = torch.float16) -> int:
    """The ideal size of the compressed layers: codes (or values) + positions (or bitmask) + scales/zeros,
    without any padding, for reporting against the bytes actually written."""
    nbits = 0
    for rec in records.values():
        numel = rec.shape[0] * rec.shape[1]
        nm = parse_nm(rec.pattern)
        if nm:
            kept, index_bits = numel * nm[0] / nm[1], numel * nm[0] / nm[1] * position_bits(nm[1])
        elif rec.pattern == "unstructured":
            kept, index_bits = round(numel * (1 - rec.sparsity)), numel
        else:
            kept, index_bits = numel, 0
        nbits += kept * (rec.bits or torch.finfo(value_dtype).bits) + index_bits
        for t in (rec.scales, rec.zeros):
            nbits += 0 if t is None else t.numel() * t.element_size() * 8
    return math.ceil(nbits / 8)
