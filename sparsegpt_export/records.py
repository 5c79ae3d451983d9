"""What a compression run writes to disk, and reads back: the one source of truth every converter works from.

- `LayerRecord`: one compressed layer besides its weight (pattern, achieved sparsity, bits, group size, grid
  kind, and the exact scales and zero points);
- `CompressionResult`: the records of a run with its report and config;
- the scales sidecar ``sparsegpt_quant.safetensors``: per compressed layer ``<module>.scales`` [out, ngroups]
  in the scale dtype and, for asymmetric grids, ``<module>.zeros`` (uint8); its metadata holds each layer's
  record as JSON. With the weights these give every converter the exact integer codes.

Converters import this module, never the compression pipeline.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from .config import SparseGPTConfig
from .quant import QuantSpec

QUANT_FILE = "sparsegpt_quant.safetensors"
CONFIG_FILE = "sparsegpt_config.json"
REPORT_FILE = "sparsegpt_report.json"
FORMAT_VERSION = 1
RECORD_FIELDS = ("shape", "pattern", "sparsity", "bits", "group_size", "sym")


@dataclass
class LayerRecord:
    """What a converter needs of one compressed layer besides its weight (the one source of truth)."""

    name: str
    shape: tuple[int, int]  # [out, in]
    pattern: str  # "2:4", "4:8", "unstructured", "dense" (quantized only)
    sparsity: float
    bits: Optional[int]
    group_size: Optional[int]
    sym: bool
    scales: Optional[torch.Tensor] = None  # [out, ngroups] in the scale storage dtype
    zeros: Optional[torch.Tensor] = None  # [out, ngroups] uint8, asymmetric only

    def quant_spec(self) -> Optional[QuantSpec]:
        if self.bits is None:
            return None
        return QuantSpec(self.bits, self.group_size, self.sym, self.scales.dtype if self.scales is not None else torch.float16)

    def meta(self) -> dict[str, Any]:
        """The JSON part of the record (everything but the tensors)."""
        return {"shape": list(self.shape), "pattern": self.pattern, "sparsity": self.sparsity, "bits": self.bits,
                "group_size": self.group_size, "sym": self.sym}

    @classmethod
    def from_meta(cls, name: str, meta: dict[str, Any], scales: Optional[torch.Tensor] = None,
                  zeros: Optional[torch.Tensor] = None) -> "LayerRecord":
        return cls(name=name, shape=tuple(meta["shape"]), pattern=meta["pattern"], sparsity=meta["sparsity"],
                   bits=meta["bits"], group_size=meta["group_size"], sym=meta["sym"], scales=scales, zeros=zeros)


@dataclass
class CompressionResult:
    records: dict[str, LayerRecord]
    report: dict[str, Any]
    config: SparseGPTConfig
    expert_records: dict[str, LayerRecord] = field(default_factory=dict)  # fused 3-D experts: <param>.<expert>


def quant_tensors(records: dict[str, LayerRecord], prefix: str = "") -> dict[str, torch.Tensor]:
    """The sidecar's tensors (``<module>.scales``, ``<module>.zeros``) of the records whose name starts with
    ``prefix``."""
    tensors: dict[str, torch.Tensor] = {}
    for name, rec in records.items():
        if not name.startswith(prefix):
            continue
        if rec.scales is not None:
            tensors[f"{name}.scales"] = rec.scales.contiguous()
        if rec.zeros is not None:
            tensors[f"{name}.zeros"] = rec.zeros.contiguous()
    return tensors


def write_sidecar(folder: Path, result: CompressionResult) -> None:
    """``sparsegpt_quant.safetensors``, ``sparsegpt_config.json`` and ``sparsegpt_report.json`` into ``folder``."""
    from safetensors.torch import save_file

    layers = {name: rec.meta() for name, rec in result.records.items()}
    meta = {"format": "sparsegpt-compressed", "format_version": str(FORMAT_VERSION), "layers": json.dumps(layers)}
    tensors = quant_tensors(result.records)
    if result.expert_records:  # fused 3-D experts, one record per expert matrix <param>.<expert> (see moe.py)
        meta["experts"] = json.dumps({name: rec.meta() for name, rec in result.expert_records.items()})
        tensors.update(quant_tensors(result.expert_records))
    save_file(tensors, str(folder / QUANT_FILE), metadata=meta)
    result.config.to_json_file(folder / CONFIG_FILE)
    (folder / REPORT_FILE).write_text(json.dumps(result.report, indent=2) + "\n")


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
        return {name: LayerRecord.from_meta(
            name, d, scales=sf.get_tensor(f"{name}.scales") if f"{name}.scales" in keys else None,
            zeros=sf.get_tensor(f"{name}.zeros") if f"{name}.zeros" in keys else None) for name, d in layers.items()}


def load_config(folder: str | os.PathLike) -> Optional[SparseGPTConfig]:
    f = Path(folder) / CONFIG_FILE
    return SparseGPTConfig.from_json_file(f) if f.is_file() else None
