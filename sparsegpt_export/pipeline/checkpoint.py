"""Checkpoint and resume. After every block the finished block's compressed weights, its layers' scales and the
run's records and report rows are kept (``block_NNNNN.safetensors``, ``quant_NNNNN.safetensors``, ``state.json``);
no activations. ``--resume`` loads them and recomputes the next block's calibration inputs by running the windows
through the finished blocks, which gives the very inputs the interrupted run had (the same weights, the same
windows in the same chunks, the same arithmetic).

With ``--offload disk`` the block files are the output's shards; with several ranks rank 0 writes and every rank
recomputes its own windows.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from .. import distributed as distmod
from ..config import ConfigError
from ..records import LayerRecord, quant_tensors
from .blockrun import forward_only
from .state import RunState

logger = logging.getLogger(__name__)

# Testing aid: the process exits at once (no cleanup, as if killed) right after the checkpoint of this block.
CRASH_ENV = "SPARSEGPT_EXPORT_CRASH_AFTER_BLOCK"


def block_file(ckpt: Path, bi: int) -> Path:
    return ckpt / f"block_{bi:05d}.safetensors"


def clear(state: RunState) -> None:
    """A fresh run: an old checkpoint is removed (after every rank has looked for it)."""
    if state.ckpt is None or not state.ckpt.exists():
        return
    distmod.barrier(state.dist, "the start-up barrier")
    if state.dist is None or state.dist.is_main:
        shutil.rmtree(state.ckpt, ignore_errors=True)


def save(state: RunState, bi: int, block: nn.Module) -> None:
    """After block ``bi``: rank 0 keeps the block's weights, its layers' scales and the run's state."""
    if state.ckpt is None:
        return
    distmod.barrier(state.dist, f"the checkpoint after block {bi}")
    if state.dist is None or state.dist.is_main:
        _write_block(state, bi, block)
    distmod.barrier(state.dist, f"the checkpoint after block {bi}")
    if os.environ.get(CRASH_ENV) == str(bi):  # fault injection for the resume tests: die like a kill
        logger.error("%s=%d: exiting right after the checkpoint of block %d", CRASH_ENV, bi, bi)
        os._exit(75)


def _write_block(state: RunState, bi: int, block: nn.Module) -> None:
    from safetensors.torch import save_file

    ckpt = state.ckpt
    ckpt.mkdir(parents=True, exist_ok=True)
    prefix = f"{state.path}.{bi}."
    tensors = {prefix + k: v.detach().cpu().contiguous() for k, v in block.state_dict().items()}
    experts = state.experts.expert_records if state.experts is not None else {}
    quant = {**quant_tensors(state.records, prefix), **quant_tensors(experts, prefix)}
    for fname, data in ((f"quant_{bi:05d}.safetensors", quant),
                        (block_file(ckpt, bi).name, tensors)):
        tmp = ckpt / (fname + ".tmp")
        save_file(data, str(tmp))
        os.replace(tmp, ckpt / fname)
    meta = {"run_key": state.run_key, "next_block": bi + 1, "rows": state.rows,
            "records": {n: r.meta() for n, r in state.records.items()},
            "expert_records": {n: r.meta() for n, r in experts.items()}}
    tmpj = ckpt / "state.json.tmp"
    tmpj.write_text(json.dumps(meta))
    os.replace(tmpj, ckpt / "state.json")


def load(state: RunState) -> int:
    """Records, report rows and (in memory) the finished blocks' weights of the checkpoint; the next block."""
    from safetensors.torch import load_file

    state_f = state.ckpt / "state.json"
    if not state_f.exists():
        logger.warning("--resume: no checkpoint in %s; starting from the first block", state.ckpt)
        return 0
    meta = json.loads(state_f.read_text())
    if meta.get("run_key") != state.run_key:
        raise ConfigError(
            f"--resume: the checkpoint in {state.ckpt} was made with another model, configuration, calibration data or "
            "number of ranks; remove it or run without --resume")
    nb = int(meta["next_block"])
    saved: dict[str, torch.Tensor] = {}
    for bi in range(nb):
        if state.store is None:
            _load_block(state, bi, state.blocks[bi])
        saved.update(load_file(str(state.ckpt / f"quant_{bi:05d}.safetensors")))
    for name, r in meta["records"].items():
        state.records[name] = LayerRecord.from_meta(name, r, saved.get(name + ".scales"), saved.get(name + ".zeros"))
    for name, r in meta.get("expert_records", {}).items():
        state.experts.expert_records[name] = LayerRecord.from_meta(name, r, saved.get(name + ".scales"),
                                                                   saved.get(name + ".zeros"))
    state.rows.extend(meta["rows"])
    return nb


def _load_block(state: RunState, bi: int, block: nn.Module) -> None:
    from safetensors.torch import load_file

    f = block_file(state.ckpt, bi)
    if not f.is_file():
        raise ConfigError(f"--resume: {f} is missing from the checkpoint in {state.ckpt}; remove the checkpoint or run "
                          "without --resume")
    t = load_file(str(f))
    prefix = f"{state.path}.{bi}."
    block.load_state_dict({k[len(prefix):]: v for k, v in t.items()}, strict=True)


def replay(state: RunState, nb: int, chunks, device: torch.device, spill: bool) -> list:
    """The inputs of block ``nb``: the windows run through the finished blocks 0..nb-1."""
    for bi in range(nb):
        block = state.blocks[bi]
        if state.store is not None:
            state.store.fetch_staged(bi, block, device, block_file(state.ckpt, bi))
        orig = next(block.parameters()).device
        block.to(device)
        if state.per_block is not None:  # layers of several kinds: this block's own keyword arguments
            chunks = [(hs, state.per_block[ci][bi]) for ci, (hs, _) in enumerate(chunks)]
        outs = forward_only(block, chunks, device if spill else None)
        chunks = [(o.cpu() if spill else o, kw) for o, (_, kw) in zip(outs, chunks)]
        if state.store is not None:
            state.store.release(bi, block)
        else:
            block.to(orig)
    logger.info("resumed from block %d (its inputs recomputed through the finished blocks)", nb)
    return chunks
