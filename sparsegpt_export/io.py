"""Writing (and reading back) the output of ``compress``.

The folder is a plain Hugging Face checkpoint (safetensors weights in the model's dtype, zeros included, which
plain transformers loads without this package) plus:

- ``sparsegpt_quant.safetensors``: the scales sidecar (`sparsegpt_export.records`), from which every converter
  recovers the exact integer codes;
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
from typing import Any, Iterator


from .records import (CONFIG_FILE, FORMAT_VERSION, QUANT_FILE, REPORT_FILE, CompressionResult, load_config,
                      load_records, write_sidecar)

__all__ = ["CONFIG_FILE", "FORMAT_VERSION", "QUANT_FILE", "REPORT_FILE", "OutputError", "atomic_dir", "check_writable",
           "load_config", "load_records", "save_compressed", "save_streamed"]


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
        write_sidecar(tmp, result)
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
        write_sidecar(tmp, result)
    return Path(out)
