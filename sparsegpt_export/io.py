"""Writing (and reading back) the output of ``compress``.

The folder is a plain Hugging Face checkpoint (safetensors weights in the model's dtype, zeros included, which
plain transformers loads without this package) plus:

- ``sparsegpt_quant.safetensors``: per compressed layer ``<module>.scales`` [out, ngroups] in the scale dtype
  and, for asymmetric grids, ``<module>.zeros`` (uint8); its metadata holds each layer's record (pattern, bits,
  group size, shape) as JSON. With the weights these give every converter the exact integer codes.
- ``sparsegpt_config.json``: the `SparseGPTConfig` (JSON round trip);
- ``sparsegpt_report.json``: per layer pattern, sparsity, bits, relative error, damping and time.

Every write goes to a temporary folder beside the target and is renamed at the end, so an interrupted run
never leaves a folder that looks complete.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from .config import SparseGPTConfig
from .driver import CompressionResult, LayerRecord

QUANT_FILE = "sparsegpt_quant.safetensors"
CONFIG_FILE = "sparsegpt_config.json"
REPORT_FILE = "sparsegpt_report.json"
FORMAT_VERSION = 1


class OutputError(OSError):
    """The output folder cannot be written; the message names it."""


def check_writable(out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Fail early (before any compression work) when ``out`` cannot be written."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out}: exists and is not a folder")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise OutputError(f"--out {out}: folder exists and is not empty; pass --overwrite to replace it")
    parent = out.absolute().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"--out {out}: cannot create the parent folder ({e.strerror})") from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"--out {out}: the folder {parent} is not writable")
    return out


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``out``; on success it replaces ``out``, on failure it is removed."""
    out = check_writable(out, overwrite)
    parent = out.absolute().parent
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    try:
        yield tmp
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=parent))
            os.replace(out, old / "x")
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def save_compressed(model: Any, tokenizer: Any, result: CompressionResult, out: str | os.PathLike, overwrite: bool = False) -> Path:
    from safetensors.torch import save_file

    from .models import strip_quantization_config

    with atomic_dir(out, overwrite) as tmp:
        strip_quantization_config(model.config)
        model.save_pretrained(tmp)
        if not _has_layers(tmp, result):
            # transformers renamed (or merged) some compressed layers on save, back to the family's original checkpoint
            # layout: keep the module names, which the records and every converter use (from_pretrained reads both)
            for f in tmp.glob("model*.safetensors*"):
                f.unlink()
            model.save_pretrained(tmp, save_original_format=False)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        _write_side_files(tmp, result)
    return Path(out)


def _has_layers(folder: Path, result: CompressionResult) -> bool:
    """Whether the checkpoint in ``folder`` holds every compressed layer's weight under its module name."""
    from safetensors import safe_open

    keys: set[str] = set()
    for f in folder.glob("model*.safetensors"):
        with safe_open(str(f), framework="pt") as sf:
            keys.update(sf.keys())
    return all(f"{name}.weight" in keys for name in result.records)


def save_streamed(model: Any, tokenizer: Any, result: CompressionResult, out: str | os.PathLike, store: Any,
                  overwrite: bool = False) -> Path:
    """The output of an ``--offload disk`` run: the staged block shards (hard-linked when the file system allows,
    copied otherwise) and one shard with the tensors outside the blocks, streamed from the source checkpoint, with
    ``model.safetensors.index.json``; then the same side files as :func:`save_compressed`."""
    from .models import strip_quantization_config
    from .offload import copy_tensors, file_tensor_sizes

    n = store.num_blocks + 1
    with atomic_dir(out, overwrite) as tmp:
        weight_map: dict[str, str] = {}
        total = 0
        for bi in range(store.num_blocks):
            src, name = store.block_file(bi), f"model-{bi + 1:05d}-of-{n:05d}.safetensors"
            if not src.is_file():
                raise OutputError(f"--offload disk: the staged block {src} is missing; rerun with --resume")
            try:
                os.link(src, tmp / name)
            except OSError:
                shutil.copyfile(src, tmp / name)
            for k, nbytes in file_tensor_sizes(tmp / name).items():
                weight_map[k] = name
                total += nbytes
        # the tensors outside the blocks (embeddings, final norm, lm_head), streamed from the source unchanged
        name = f"model-{n:05d}-of-{n:05d}.safetensors"
        rest = store.rest_keys()
        total += copy_tensors(store.source, rest, tmp / name)
        weight_map.update({k: name for k in rest})
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        strip_quantization_config(model.config)
        model.config.save_pretrained(tmp)
        gen = store.source.folder / "generation_config.json"
        if gen.is_file():
            shutil.copyfile(gen, tmp / gen.name)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        _write_side_files(tmp, result)
    return Path(out)


def _record_entries(records: dict[str, LayerRecord], tensors: dict[str, torch.Tensor]) -> dict[str, dict]:
    """The JSON entries of ``records``; their scales and zero points are added to ``tensors``."""
    layers: dict[str, dict] = {}
    for name, rec in records.items():
        layers[name] = {
            "shape": list(rec.shape), "pattern": rec.pattern, "sparsity": rec.sparsity, "bits": rec.bits,
            "group_size": rec.group_size, "sym": rec.sym,
        }
        if rec.scales is not None:
            tensors[f"{name}.scales"] = rec.scales.contiguous()
        if rec.zeros is not None:
            tensors[f"{name}.zeros"] = rec.zeros.contiguous()
    return layers


def _write_side_files(tmp: Path, result: CompressionResult) -> None:
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    layers = _record_entries(result.records, tensors)
    meta = {"format": "sparsegpt-compressed", "format_version": str(FORMAT_VERSION), "layers": json.dumps(layers)}
    if result.expert_records:  # fused 3-D experts, one record per expert matrix <param>.<expert> (see moe.py)
        meta["experts"] = json.dumps(_record_entries(result.expert_records, tensors))
    save_file(tensors, str(tmp / QUANT_FILE), metadata=meta)
    result.config.to_json_file(tmp / CONFIG_FILE)
    (tmp / REPORT_FILE).write_text(json.dumps(result.report, indent=2) + "\n")


def load_records(folder: str | os.PathLike, key: str = "layers") -> dict[str, LayerRecord]:
    """The layer records of a ``compress`` output (scales and zero points included); ``key="experts"``: the records
    of the fused expert matrices (``<param>.<expert>``), which are not linear layers."""
    from safetensors import safe_open

    f = Path(folder) / QUANT_FILE
    if not f.is_file():
        raise FileNotFoundError(f"{folder}: no {QUANT_FILE}; is this the output of `sparsegpt-export compress`?")
    with safe_open(str(f), framework="pt") as sf:
        meta = sf.metadata() or {}
        version = int(meta.get("format_version", "0"))
        if version > FORMAT_VERSION:
            raise ValueError(f"{f}: format_version {version} is newer than this package understands ({FORMAT_VERSION})")
        layers = json.loads(meta.get(key, "{}"))
        keys = set(sf.keys())
        records = {}
        for name, d in layers.items():
            records[name] = LayerRecord(
                name=name, shape=tuple(d["shape"]), pattern=d["pattern"], sparsity=d["sparsity"], bits=d["bits"],
                group_size=d["group_size"], sym=d["sym"],
                scales=sf.get_tensor(f"{name}.scales") if f"{name}.scales" in keys else None,
                zeros=sf.get_tensor(f"{name}.zeros") if f"{name}.zeros" in keys else None,
            )
    return records


def load_config(folder: str | os.PathLike) -> Optional[SparseGPTConfig]:
    f = Path(folder) / CONFIG_FILE
    return SparseGPTConfig.from_json_file(f) if f.is_file() else None
