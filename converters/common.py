"""What the converters share: the N:M pattern of a layer, its quantization grid and exact integer codes (checked
against the weights), and which layers a checkpoint stores transposed. Each format module imports these from here
and the records from `sparsegpt_export.records`, never another format's module or the pipeline."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from sparsegpt_export.records import LayerRecord
from sparsegpt_export.solver import expand_groups


def parse_nm(pattern: str) -> Optional[tuple[int, int]]:
    if ":" not in pattern:
        return None
    n, m = (int(x) for x in pattern.split(":"))
    return n, m


def grid(name: str, shape: tuple[int, int], bits: int, group_size: Optional[int], scales: torch.Tensor,
          zeros: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point of every weight, float32 [out, in]; symmetric grids use zero = 2^(bits-1)."""
    rows, cols = shape
    ngroups = -(-cols // (group_size or cols))
    if tuple(scales.shape) != (rows, ngroups):
        raise ValueError(f"layer {name}: scales have shape {tuple(scales.shape)}, expected {(rows, ngroups)}")
    if zeros is not None and tuple(zeros.shape) != (rows, ngroups):
        raise ValueError(f"layer {name}: zeros have shape {tuple(zeros.shape)}, expected {(rows, ngroups)}")
    s = scales.float()
    z = zeros.float() if zeros is not None else torch.full_like(s, float(2 ** (bits - 1)))
    return expand_groups(s, z, cols, group_size)


def weight_codes(name: str, rec: LayerRecord, w: torch.Tensor) -> torch.Tensor:
    """The integer codes of ``w`` [out, in], checked to reproduce every weight exactly (uint8)."""
    if rec.scales is None or (not rec.sym and rec.zeros is None):
        raise ValueError(f"layer {name}: {rec.bits}-bit layer without scales/zeros in the quantization sidecar")
    s, z = grid(name, rec.shape, rec.bits, rec.group_size, rec.scales, None if rec.sym else rec.zeros)
    q = (torch.round(w.float() / s) + z).clamp(0, 2**rec.bits - 1)
    bad = (s * (q - z)).to(w.dtype) != w
    if bad.any():
        r, c = (int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"layer {name}: weight {w[r, c].item():g} at row {r}, column {c} is not on its {rec.bits}-bit grid "
            f"(scale {s[r, c].item():g}); the weights and the quantization sidecar do not match"
        )
    return q.to(torch.uint8)


def check_nm(name: str, nz: torch.Tensor, n: int, m: int) -> None:
    """``nz`` [out, groups, m] bool: at most n nonzeros per group, else a ValueError naming the first offender."""
    count = nz.sum(-1)
    if (count > n).any():
        r, g = (int(i) for i in (count > n).nonzero()[0])
        raise ValueError(
            f"layer {name}: {int(count[r, g])} nonzeros in a group of {m} at row {r}, group {g}; not {n}:{m}")


def conv1d_modules(src: Path, names: list[str]) -> set[str]:
    """The layers stored transposed ([in, out], GPT-2's Conv1D), found on a weightless (meta) instance."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from sparsegpt_export.models import strip_quantization_config

    config = AutoConfig.from_pretrained(str(src))
    strip_quantization_config(config)
    with torch.device("meta"):
        try:
            model = AutoModelForCausalLM.from_config(config)
        except ValueError:  # a config class the auto mapping lacks (a causal LM's text config): its own class
            import transformers

            model = getattr(transformers, (config.architectures or [""])[0])._from_config(config)
    return {n for n in names if type(model.get_submodule(n)).__name__ == "Conv1D"}
