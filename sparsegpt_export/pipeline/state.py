"""The state of one compression run, in one object that the pipeline's parts pass around (no closures), and the
small helpers that set it up (device, batch size, scale dtype)."""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from ..config import ConfigError, SparseGPTConfig, parse_pattern
from ..quant import QuantSpec
from ..records import LayerRecord
from ..solver import LayerTask, SolveOptions, SolverError
from ..solver.obs import kernel_sweep


def resolve_device(device: Optional[str]) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device: {device!r} was asked for but CUDA is not available on this machine")
    return dev


def resolve_scale_dtype(config: SparseGPTConfig, model_dtype: torch.dtype) -> torch.dtype:
    if config.scale_dtype:
        return getattr(torch, config.scale_dtype)
    return model_dtype if model_dtype in (torch.float16, torch.bfloat16) else torch.float16


def available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def _size(cfg: Any, *names: str) -> Optional[int]:
    """The first of the config attributes ``names`` that is set; per-layer lists (Gemma 3n's intermediate sizes)
    give their largest entry. None when none is set or readable."""
    for name in names:
        try:
            v = getattr(cfg, name, None)
        except Exception:  # noqa: BLE001  (a per-layer attribute that a heterogeneous config refuses to read globally)
            v = None
        if isinstance(v, (list, tuple)):
            v = max((x for x in v if isinstance(x, int)), default=None)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


def auto_batch_size(model: nn.Module, nsamples: int, seqlen: int, device: torch.device,
                    budget: Optional[float] = None) -> int:
    """How many calibration windows go through a block at once: all of them when the activations fit in
    ``budget`` bytes (default: 35% of the device's free memory)."""
    cfg = getattr(model, "config", None)
    hidden = _size(cfg, "hidden_size", "n_embd") or 1024
    inter = _size(cfg, "intermediate_size", "n_inner") or 4 * hidden
    heads = _size(cfg, "num_attention_heads", "n_head") or 16
    per_sample = seqlen * (8 * hidden + 4 * inter) * 4 + heads * seqlen * seqlen * 4
    budget = 0.35 * available_bytes(device) if budget is None else budget
    return max(1, min(nsamples, int(budget // max(per_sample, 1))))


def hash_tensor(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def solve_options(config: SparseGPTConfig, scale_dtype: torch.dtype, device: Any = "cpu") -> SolveOptions:
    """The solver's settings; on the CPU, ADMM's row slices take the process's threads (one each: the result does
    not depend on their number)."""
    quant = QuantSpec(config.bits, config.group_size, config.sym, scale_dtype, config.clip_search) if config.bits else None
    return SolveOptions(quant=quant, update=config.update, quant_order=config.quant_order, saliency=config.saliency,
                        blocksize=config.blocksize, mask_blocksize=config.mask_blocksize, damp=config.damp,
                        fit_scales_to_kept=config.fit_scales_to_kept, refit_scales=config.refit_scales,
                        refine_steps=config.refine_steps, admm_mask=config.admm_mask,
                        sweep=checked_sweep(config.sweep, device),
                        workers=torch.get_num_threads() if torch.device(device).type == "cpu" else 1)


def checked_sweep(sweep: str, device: Any) -> str:
    """``sweep``, when ``device`` can run it (else a ConfigError naming the option, before any work)."""
    try:
        kernel_sweep(sweep, torch.device(device))
    except SolverError as e:
        raise ConfigError(str(e)) from None
    return sweep


class Progress:
    """A tqdm bar over the blocks (nothing when disabled or without tqdm)."""

    def __init__(self, enabled: bool, total: int, desc: str):
        self.bar = None
        if enabled:
            try:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total, desc=desc, unit="block", dynamic_ncols=True)
            except ImportError:  # pragma: no cover
                self.bar = None

    def postfix(self, text: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=True)

    def update(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@dataclass
class RunState:
    """Everything a compression run shares between its parts. The parts read the settings and add to ``records``,
    ``rows`` and ``prof``; nothing else is mutated behind their back."""

    config: SparseGPTConfig
    device: torch.device
    path: str  # the dotted path of the block list
    blocks: nn.ModuleList
    opts: SolveOptions
    scale_dtype: torch.dtype
    hdtype: torch.dtype
    plan: dict
    dist: Any = None  # distributed.Dist under torchrun, else None
    store: Any = None  # offload.DiskStore with --offload disk
    ckpt: Optional[Path] = None
    run_key: str = ""
    hessian_group: Optional[int] = None  # windows per Hessian group (solver.hessian.group_windows)
    per_block: Optional[list] = None  # [chunk][block] keyword arguments of decoders with several layer kinds
    experts: Any = None  # moe.ExpertsContext: fused 3-D experts
    model_name: str = ""
    smooth_alpha: float = 0.0  # the blocks' smoothing strength (config.resolved_smooth_alpha): 0 for none
    bar: Any = None
    records: dict[str, LayerRecord] = field(default_factory=dict)
    rows: list[dict] = field(default_factory=list)
    reconstructed: list[dict] = field(default_factory=list)  # per block, with --reconstruct-steps
    prof: dict[str, float] = field(default_factory=lambda: {
        "capture_s": 0.0, "hessian_s": 0.0, "solve_s": 0.0, "block_forward_s": 0.0, "checkpoint_s": 0.0})

    def time(self, key: str, seconds: float) -> None:
        self.prof[key] = self.prof.get(key, 0.0) + seconds

    def task(self, lname: str, prune: bool = True) -> tuple[str, LayerTask]:
        """The layer's pattern (from the plan, else the config's) and what its solve does."""
        pattern = self.plan["pattern"].get(lname, self.config.pattern)
        prune = prune and self.config.prunes and pattern != "dense"
        n, m = parse_pattern(pattern) if prune else (0, 0)
        sparsity = self.plan["sparsity"].get(lname, self.config.sparsity) if prune else 0.0
        return pattern, LayerTask(prune=prune, n=n, m=m, sparsity=sparsity)

    def postfix(self, text: str) -> None:
        if self.bar is not None:
            self.bar.postfix(text)


def run_key(config: SparseGPTConfig, calib: torch.Tensor, model_name: str, num_blocks: int, world: int) -> str:
    """What a checkpoint must match to be resumed: the config, the calibration data, the model and the ranks."""
    return hashlib.sha256(
        (json.dumps(config.to_dict(), sort_keys=True) + hash_tensor(calib) + model_name + str(num_blocks)
         + (f"|world={world}" if world > 1 else "")).encode()
    ).hexdigest()[:16]
