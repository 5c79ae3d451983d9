"""The per-layer plan of a run: sparsity and pattern per layer when the config asks for more than one for all
(``allocation``, ``dense_fraction``, ``mix_pattern``), from the sensitivity scores or OWL's outlier ratios of the
dense model. Runs before any block is compressed, on the device the model is loaded on."""
from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from .. import sensitivity as sens
from ..anatomy import get_weight, selected_layers
from ..config import SparseGPTConfig
from .state import hash_tensor

logger = logging.getLogger(__name__)


def empty_plan() -> dict[str, Any]:
    return {"sparsity": {}, "pattern": {}, "scores": {}, "notes": [], "method": None, "sensitivity": None,
            "dense": [], "mixed": []}


def plan_layers(model: nn.Module, path: str, blocks: nn.ModuleList, calib: torch.Tensor, config: SparseGPTConfig, *,
                progress: bool = False, model_name: str = "", cache: Optional[str | os.PathLike] = None) -> dict:
    """Returns ``{"sparsity", "pattern", "scores", "notes", ...}`` (empty dicts for a uniform run)."""
    plan = empty_plan()
    nm = config.nm[0] > 0
    if config.allocation == "uniform" and not config.dense_fraction and not config.mix_fraction:
        return plan
    layers = selected_layers(path, blocks, config.targets, config.ignore)
    names = list(layers)
    numel = {k: get_weight(v).numel() for k, v in layers.items()}
    plan["method"] = config.allocation if not nm else "nm-choice"
    stats = None
    if config.allocation == "owl" or config.sensitivity == "proxy":
        stats = sens.input_statistics(model, names, calib, progress=progress)
    if config.allocation == "owl":
        return _owl(plan, path, layers, stats, numel, config)
    compute = functools.partial(sens.estimate, model, names, calib, method=config.sensitivity, probes=config.probes,
                                seed=config.seed, progress=progress, stats=stats)
    plan["sensitivity"] = config.sensitivity
    if cache:
        scores, note = sens.cached_scores(Path(cache), sens.model_signature(model, names, model_name), config.sensitivity,
                                          config.probes, config.seed, hash_tensor(calib), compute)
        plan["cache"] = note
        if "recomputed" in note:
            plan["notes"].append(note)
            logger.warning("%s", note)
        else:
            logger.info("%s", note)
    else:
        scores = compute()
    plan["scores"] = scores
    if not nm:
        plan["sparsity"], notes = sens.allocate("sensitivity", config.sparsity, numel, scores=scores, alpha=config.alpha)
        plan["notes"] += notes
        return plan
    return _nm_choice(plan, scores, names, config)


def _owl(plan: dict, path: str, layers: dict[str, nn.Module], stats: dict, numel: dict, config: SparseGPTConfig) -> dict:
    """Each block's density from its outlier ratio (Yin et al., 2023)."""
    by_block: dict[str, list[str]] = {}
    for k in layers:
        by_block.setdefault(sens.block_of(k, path), []).append(k)
    outliers = {b: sens.outlier_ratio([get_weight(layers[k]) for k in ks], [stats[k] for k in ks], config.owl_m)
                for b, ks in by_block.items()}
    plan["scores"] = {k: outliers[sens.block_of(k, path)] for k in layers}
    plan["sparsity"], notes = sens.allocate("owl", config.sparsity, numel, blocks={k: sens.block_of(k, path) for k in layers},
                                            outliers=outliers, owl_lambda=config.owl_lambda)
    plan["notes"] += notes
    return plan


def _nm_choice(plan: dict, scores: dict, names: list[str], config: SparseGPTConfig) -> dict:
    """N:M: the most sensitive layers dense, the next ones the second pattern."""
    dense = sens.nm_choice(scores, config.dense_fraction) if config.dense_fraction else []
    rest = {k: v for k, v in scores.items() if k not in dense}
    mixed = sens.nm_choice(rest, config.mix_fraction) if config.mix_fraction else []
    plan["dense"], plan["mixed"] = dense, mixed
    plan["pattern"] = {k: "dense" if k in dense else (config.mix_pattern if k in mixed else config.pattern) for k in names}
    return plan
