"""``dense``: the compressed checkpoint as a plain dense Hugging Face checkpoint in another dtype.

The weights keep their zeros (and their dequantized values), so any runtime that reads safetensors serves the
result; nothing is gained in size over the dense model, this is the interchange format. The helpers here
(reading a checkpoint's tensors with safetensors only, the export dtype, the files that travel along) are
shared by the other converters.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from sparsegpt_export.io import atomic_dir

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# weights in any format (the quantization sidecar included) are never carried over: each converter writes its own
_NOT_COPIED = (".safetensors", ".safetensors.index.json", ".bin", ".pt", ".pth", ".ckpt", ".gguf")


def read_config(src: str | os.PathLike) -> dict:
    f = Path(src) / "config.json"
    if not f.is_file():
        raise FileNotFoundError(f"{src}: no config.json; is this the output of `sparsegpt-export compress`?")
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{f}: not valid JSON ({e})") from None


def resolve_dtype(config: dict, dtype: str | torch.dtype | None = None) -> torch.dtype:
    """The export dtype: ``dtype`` when given, else the model's own (float16 when that is float32)."""
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"dtype {dtype}: choose one of {sorted(DTYPES)}")
        return dtype
    if dtype is None:
        dtype = config.get("dtype") or config.get("torch_dtype") or "float32"
        dtype = "float16" if dtype == "float32" else dtype
    name = str(dtype).replace("torch.", "")
    if name not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: choose one of {sorted(DTYPES)}")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def weight_files(src: str | os.PathLike) -> list[Path]:
    """``model.safetensors``, or the shards its index names."""
    src = Path(src)
    if (src / WEIGHTS_FILE).is_file():
        return [src / WEIGHTS_FILE]
    if (src / INDEX_FILE).is_file():
        index = json.loads((src / INDEX_FILE).read_text())
        return [src / f for f in sorted(set(index.get("weight_map", {}).values()))]
    raise FileNotFoundError(f"{src}: no {WEIGHTS_FILE} (safetensors weights are required; .bin files are not read)")


def read_safetensors(f: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the metadata of one file; a truncated or corrupt file is a ValueError naming it."""
    from safetensors import SafetensorError, safe_open

    if not f.is_file():
        raise FileNotFoundError(f"{f}: missing")
    try:
        with safe_open(str(f), framework="pt") as sf:
            return {k: sf.get_tensor(k) for k in sf.keys()}, dict(sf.metadata() or {})
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise ValueError(f"{f}: cannot be read as safetensors ({e}); the file is truncated or corrupt") from None


def read_checkpoint(src: str | os.PathLike) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for f in weight_files(src):
        tensors.update(read_safetensors(f)[0])
    return tensors


def cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Floating tensors to ``dtype``; integer tensors are left alone."""
    return t.to(dtype).contiguous() if t.is_floating_point() else t.contiguous()


def write_config(config: dict, folder: Path, dtype: torch.dtype) -> None:
    """config.json with the dtype fields set to ``dtype`` (``dtype`` and/or the older ``torch_dtype``)."""
    config = dict(config)
    keys = [k for k in ("dtype", "torch_dtype") if k in config] or ["dtype"]
    for k in keys:
        config[k] = dtype_name(dtype)
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def copy_side_files(src: str | os.PathLike, dst: Path) -> None:
    """Tokenizer, generation config, sparsegpt_config/report.json...: every top-level file but weights and config."""
    for f in Path(src).iterdir():
        if f.is_file() and not f.name.startswith(".") and f.name != "config.json" and not f.name.endswith(_NOT_COPIED):
            shutil.copy2(f, dst / f.name)


def export(src: str | os.PathLike, out: str | os.PathLike, dtype: str | torch.dtype | None = None,
           overwrite: bool = False) -> Path:
    """Write ``src`` (a compress output, or any safetensors checkpoint) to ``out`` as dense weights in ``dtype``."""
    from safetensors.torch import save_file

    config = read_config(src)
    dt = resolve_dtype(config, dtype)
    tensors = {k: cast(v, dt) for k, v in read_checkpoint(src).items()}
    config.pop("quantization_config", None)
    with atomic_dir(out, overwrite) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        write_config(config, tmp, dt)
        copy_side_files(src, tmp)
    return Path(out)

