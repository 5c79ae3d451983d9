"""Compress a model larger than memory: ``--offload disk`` streams it from its safetensors files.

The model is built on the meta device (accelerate's ``init_empty_weights``: no memory for weights). Before the first
block the modules in front of it (embeddings, and whatever else is not a block or the lm_head) are read from the
checkpoint to capture the calibration inputs, then dropped. Each block is then read from the files (memory-mapped,
only its own tensors), compressed on the compute device, written to the staging folder as its own safetensors
shard, and dropped again. So the process holds one block, the calibration activations and the small scales at a
time, never the model. At the end the shards are linked into the output folder with an index, beside the tensors
that were not compressed (copied from the source), all inside the usual atomic write.

The staging folder is the run's checkpoint (``--offload-dir``, by default beside ``--out``): ``--resume`` continues
after the last finished block without reading the earlier ones again.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Optional

import torch
from torch import nn

from . import hostmem

OFFLOAD_MODES = ("none", "cpu", "disk")


class OffloadError(ValueError):
    """The checkpoint or the offload folder cannot be used for ``--offload disk``; the message names it."""


class SafetensorsSource:
    """The tensors of a checkpoint folder (``model.safetensors`` or ``model.safetensors.index.json``), by key."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        single = self.folder / "model.safetensors"
        if index.is_file():
            self.files = {k: self.folder / v for k, v in json.loads(index.read_text())["weight_map"].items()}
        elif single.is_file():
            from safetensors import safe_open

            with safe_open(str(single), framework="pt") as f:
                self.files = {k: single for k in f.keys()}
        else:
            raise OffloadError(f"--offload disk: {self.folder} has no model.safetensors or model.safetensors.index.json; "
                               "disk offload streams safetensors checkpoints (save the model with save_pretrained first)")

    def get(self, keys: Iterable[str]) -> dict[str, torch.Tensor]:
        """Copies of the named tensors (each file opened once, memory-mapped, and closed again)."""
        from safetensors import safe_open

        keys = list(keys)
        missing = [k for k in keys if k not in self.files]
        if missing:
            raise OffloadError(f"--offload disk: tensor {missing[0]!r} is not in the checkpoint {self.folder} (its key "
                               "layout differs from the model's); use --offload cpu for this checkpoint")
        out: dict[str, torch.Tensor] = {}
        by_file: dict[Path, list[str]] = {}
        for k in keys:
            by_file.setdefault(self.files[k], []).append(k)
        for f, ks in by_file.items():
            with safe_open(str(f), framework="pt") as sf:
                for k in ks:
                    out[k] = sf.get_tensor(k)
        return out


def load_skeleton(folder: str | os.PathLike, dtype: Optional[str] = None) -> nn.Module:
    """The model of ``folder`` with every weight on the meta device (buffers such as rotary tables are real)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(str(folder))
    kwargs: dict[str, Any] = {}
    if dtype and dtype != "auto":
        kwargs["dtype"] = getattr(torch, dtype)
    else:
        kwargs["dtype"] = getattr(cfg, "dtype", None) or torch.float32
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(cfg, **kwargs)
    model.config._name_or_path = str(folder)
    return model.eval()


class DiskStore:
    """Brings blocks in from the source files and takes them out again (to the staging folder)."""

    def __init__(self, model: nn.Module, source: SafetensorsSource, staging: Path, blocks_path: str, num_blocks: int):
        self.model, self.source, self.staging = model, source, Path(staging)
        self.blocks_path, self.num_blocks = blocks_path, num_blocks
        self.dtype = next(model.parameters()).dtype
        check_dir(self.staging)
        hostmem.returns_memory()

    # ------------------------------------------------------------------ modules in front of the blocks
    def _front_params(self) -> list[str]:
        out_emb = self.model.get_output_embeddings()
        skip = {id(p) for p in out_emb.parameters()} if out_emb is not None else set()
        inp = self.model.get_input_embeddings()
        keep = {id(p) for p in inp.parameters()} if inp is not None else set()
        prefix = self.blocks_path + "."
        return [n for n, p in self.model.named_parameters(remove_duplicate=False)
                if not n.startswith(prefix) and (id(p) not in skip or id(p) in keep)]

    def fetch_front(self, device: torch.device) -> None:
        self._load(self.model, self._front_params(), "", device)

    def release_front(self) -> None:
        self._drop(self.model, self._front_params())

    # ------------------------------------------------------------------ blocks
    def fetch(self, bi: int, block: nn.Module, device: torch.device) -> None:
        self._load(block, [n for n, _ in block.named_parameters()], f"{self.blocks_path}.{bi}.", device)

    def fetch_staged(self, bi: int, block: nn.Module, device: torch.device, path: Path) -> None:
        """A finished block from its staged (compressed) file, to recompute the inputs of the next one on resume."""
        from accelerate.utils import set_module_tensor_to_device
        from safetensors.torch import load_file

        prefix = f"{self.blocks_path}.{bi}."
        for k, v in load_file(str(path)).items():
            set_module_tensor_to_device(block, k[len(prefix):], device, value=v, dtype=self.dtype)

    def release(self, bi: int, block: nn.Module) -> None:
        self._drop(block, [n for n, _ in block.named_parameters()])
        hostmem.trim()

    def _load(self, root: nn.Module, names: list[str], prefix: str, device: torch.device) -> None:
        from accelerate.utils import set_module_tensor_to_device

        tensors = self.source.get(prefix + n for n in names)
        for n in names:
            set_module_tensor_to_device(root, n, device, value=tensors.pop(prefix + n), dtype=self.dtype)

    @staticmethod
    def _drop(root: nn.Module, names: list[str]) -> None:
        from accelerate.utils import set_module_tensor_to_device

        for n in names:
            set_module_tensor_to_device(root, n, "meta")

    # ------------------------------------------------------------------ the output
    def block_file(self, bi: int) -> Path:
        return self.staging / f"block_{bi:05d}.safetensors"

    def rest_keys(self) -> list[str]:
        """Checkpoint tensors that are not in a block (embeddings, final norm, lm_head): copied unchanged."""
        return sorted(k for k in self.source.files if not k.startswith(self.blocks_path + "."))


def _header(path: str | os.PathLike) -> tuple[int, dict]:
    """(offset of the data buffer, header) of a safetensors file."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return 8 + n, json.loads(f.read(n))


def file_tensor_sizes(path: str | os.PathLike) -> dict[str, int]:
    """Bytes of every tensor in a safetensors file, from its header."""
    _, header = _header(path)
    return {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"}


def copy_tensors(source: SafetensorsSource, keys: list[str], out: str | os.PathLike, chunk: int = 16 << 20) -> int:
    """Write the named tensors of ``source`` unchanged into the safetensors file ``out``, streaming their bytes
    (never more than ``chunk`` in memory, whatever their size: embeddings and lm_head can be gigabytes).
    Returns the bytes of tensor data written."""
    entries, offset = [], 0
    headers: dict[Path, tuple[int, dict]] = {}
    for k in keys:
        f = source.files[k]
        if f not in headers:
            headers[f] = _header(f)
        base, h = headers[f]
        lo, hi = h[k]["data_offsets"]
        entries.append((k, f, base + lo, hi - lo, h[k]["dtype"], h[k]["shape"]))
    header: dict = {"__metadata__": {"format": "pt"}}
    for k, _, _, size, dtype, shape in entries:
        header[k] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(out, "wb") as dst:
        dst.write(len(raw).to_bytes(8, "little"))
        dst.write(raw)
        for _, f, start, size, _, _ in entries:
            with open(f, "rb") as src:
                src.seek(start)
                left = size
                while left:
                    buf = src.read(min(chunk, left))
                    if not buf:
                        raise OffloadError(f"--offload disk: {f} ends early (truncated checkpoint?)")
                    dst.write(buf)
                    left -= len(buf)
    return offset


def check_dir(folder: str | os.PathLike) -> Path:
    """Fail early (before loading anything) when the offload folder cannot be created or written."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise OffloadError(f"--offload-dir {folder}: not writable ({e.strerror or e})") from None
    return folder


def parse_memory(v: str) -> int:
    """``20GiB``, ``512MB``, ``1.5GB``, ``4096`` (bytes) -> bytes."""
    s = str(v).strip().upper().replace(" ", "")
    units = {"KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "TIB": 1 << 40, "KB": 10 ** 3, "MB": 10 ** 6,
             "GB": 10 ** 9, "TB": 10 ** 12, "B": 1}
    for u, f in units.items():
        if s.endswith(u):
            num = s[: -len(u)]
            break
    else:
        num, f = s, 1
    try:
        out = int(float(num) * f)
    except ValueError:
        raise OffloadError(f"--max-memory: {v!r} is not a size such as 20GiB or 512MB") from None
    if out <= 0:
        raise OffloadError(f"--max-memory: {v!r} must be positive")
    return out
