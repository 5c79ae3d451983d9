"""The compression of a whole model: a short loop over its blocks that only moves data.

1. the plan (per-layer sparsity, when asked for) and the inputs of the first block (hidden states and every
   keyword argument: masks, position embeddings; cache off), or on ``--resume`` the finished blocks' checkpoint
   and the inputs recomputed through them;
2. per block, on the compute device: smoothing (when asked for), then `blockrun.run_block` compresses every
   linear layer as soon as its calibration inputs are complete, the block's forward going on with the compressed
   weights; the outputs feed the next block; a checkpoint after it;
3. the lm_head (when asked for) and the report.
"""
from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from torch import nn

from .. import distributed as distmod
from .. import families, hostmem, moe, smoothing
from ..anatomy import block_linears, find_blocks, is_selected
from ..config import ConfigError, SparseGPTConfig
from ..records import CompressionResult
from ..solver import group_windows
from . import checkpoint, reconstruct
from .blockrun import run_block
from .capture import capture_block_inputs, shared_input_groups
from .layers import solve_one
from .per_block import per_block_kwargs
from .lm_head import quantize_lm_head
from .plan import plan_layers
from .report import build_report
from .state import (Progress, RunState, auto_batch_size, hash_tensor, resolve_device, resolve_scale_dtype, run_key,
                    solve_options)

logger = logging.getLogger(__name__)


def compress_model(
    model: nn.Module,
    calib: torch.Tensor,
    config: SparseGPTConfig,
    *,
    progress: bool = True,
    checkpoint_dir: Optional[str | os.PathLike] = None,
    resume: bool = False,
    model_name: str = "",
    sensitivity_cache: Optional[str | os.PathLike] = None,
    store: Any = None,
    max_memory: Optional[int] = None,
) -> CompressionResult:
    """Compress ``model`` in place with SparseGPT on the calibration windows ``calib`` [nsamples, seqlen].

    ``sensitivity_cache`` (or ``config.sensitivity_cache``): where the sensitivity scores are kept between runs.
    ``store``: where the blocks come from and go to when the model is not in memory (``offload.DiskStore``: the
    weights stay on the meta device except the block at work; its staging folder is ``checkpoint_dir``).
    ``max_memory``: bytes the calibration activations may take on the compute device; beyond it they are kept
    in host memory and moved to the device chunk by chunk (``report["activations"]`` says which).
    Under torchrun (an initialised process group) each rank works on its share of ``calib``.
    On the CPU, freed host memory is kept for reuse during the run (``hostmem.reuse_freed_memory``), except with a
    ``store``, whose point is to hold little.
    """
    device = resolve_device(config.device)
    t_start = time.perf_counter()
    with hostmem.reuse_freed_memory(store is None and device.type == "cpu"):
        state, local, batch, progress = start(model, calib, config, device, progress=progress, store=store,
                                              checkpoint_dir=checkpoint_dir, model_name=model_name,
                                              sensitivity_cache=sensitivity_cache)
        with eval_mode(model):
            chunks, spill, first = block_inputs(state, model, local, batch, max_memory, resume)
            smoothed = compress_blocks(state, model, chunks, spill, first, progress)
    report = build_report(state, nsamples=calib.shape[0], seqlen=calib.shape[1], batch=batch, spill=spill,
                          smoothed=smoothed, t_start=t_start)
    if state.experts.log or state.experts.params or state.experts.routers:
        report["moe"] = moe.report(state.experts)
    if state.dist is not None:  # where each rank's time went
        report["profile_by_rank"] = distmod.all_gather_json(state.dist, report["profile"])
    return CompressionResult(records=state.records, report=report, config=config,
                             expert_records=state.experts.expert_records)


def start(model: nn.Module, calib: torch.Tensor, config: SparseGPTConfig, device: torch.device, *, progress: bool,
          store: Any, checkpoint_dir: Any, model_name: str, sensitivity_cache: Any):
    """The run's state: blocks found, arguments checked (across the ranks too), this rank's windows, the batch
    size and the plan. Returns ``(state, local windows, batch, progress)``."""
    families.check_supported(model)
    path, blocks = find_blocks(model)
    families.check_blocks(model, blocks)
    if calib.dim() != 2:
        raise ConfigError(f"calibration: expected input_ids of shape [nsamples, seqlen], got {tuple(calib.shape)}")
    if store is not None and checkpoint_dir is None:
        raise ConfigError("offload: streaming blocks from disk needs a checkpoint_dir to stage them in")
    if store is not None and config.quantize_lm_head:
        raise ConfigError("--quantize-lm-head is not supported with --offload disk yet; use --offload cpu")
    d = distmod.current()
    if d is not None:
        distmod.check_same(d, arguments=json.dumps(config.to_dict(), sort_keys=True),
                           **{"calibration data": hash_tensor(calib)}, model=f"{model_name}|{type(model).__name__}|{len(blocks)}")
        progress = progress and d.is_main
    group = group_windows(calib.shape[1], calib.shape[0])
    local = distmod.shard(calib, d, group)
    batch = _batch_size(model, blocks, local, config, device, store)
    scale_dtype = resolve_scale_dtype(config, next(model.parameters()).dtype)
    state = RunState(config=config, device=device, path=path, blocks=blocks, opts=solve_options(config, scale_dtype, device),
                     scale_dtype=scale_dtype, hdtype=torch.float64 if config.hessian_dtype == "float64" else torch.float32,
                     plan={}, dist=d, store=store, ckpt=Path(checkpoint_dir) if checkpoint_dir else None,
                     run_key=run_key(config, calib, model_name, len(blocks), d.world if d else 1), model_name=model_name,
                     hessian_group=group, smooth_alpha=config.resolved_smooth_alpha(smoothing.smoothable(blocks)))
    t = time.perf_counter()
    if d is None or d.is_main:  # the scores need the whole calibration set: rank 0 plans, the others receive it
        state.plan = plan_layers(model, path, blocks, calib, config, progress=progress, model_name=model_name,
                                 cache=config.sensitivity_cache or sensitivity_cache)
    if d is not None:
        state.plan = distmod.broadcast_json(d, state.plan if d.is_main else None, 0)
    state.time("plan_s", time.perf_counter() - t)
    state.experts = moe.ExpertsContext(
        solve=functools.partial(solve_one, state), selected=lambda n: is_selected(n, config.targets, config.ignore),
        records=state.records, expert_records={}, rows=state.rows, log=[], params={}, hdtype=state.hdtype,
        reduce=None if d is None else functools.partial(_reduce_mean, d))
    return state, local, batch, progress


def _reduce_mean(d: Any, H: torch.Tensor, n: int) -> tuple[torch.Tensor, int]:
    """A mean Hessian over all ranks from each rank's mean ``H`` over its ``n`` tokens (for `moe`)."""
    total, ntot = distmod.all_reduce_hessian(d, H.to(torch.float64) * n, n)
    return ((total / ntot) if ntot else total).to(H.dtype), ntot


def _batch_size(model, blocks, local: torch.Tensor, config: SparseGPTConfig, device: torch.device, store: Any) -> int:
    if config.calib_batch_size:
        batch = config.calib_batch_size
    elif store is not None and device.type == "cpu":
        # streaming from disk to save host memory: a chunk's block-forward activations stay about one block's size
        block_bytes = sum(p.numel() for p in blocks[0].parameters()) * store.dtype.itemsize
        batch = auto_batch_size(model, local.shape[0], local.shape[1], device, budget=block_bytes)
    else:
        batch = auto_batch_size(model, local.shape[0], local.shape[1], device)
    logger.info("calibration: %d windows per block forward (%d chunks)", batch, -(-local.shape[0] // batch))
    return batch


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """The model in eval mode with its KV cache off for the run; restored after."""
    was_training = model.training
    model.eval()
    use_cache = getattr(getattr(model, "config", None), "use_cache", None)
    if use_cache is not None:
        model.config.use_cache = False
    try:
        yield
    finally:
        if use_cache is not None:
            model.config.use_cache = use_cache
        model.train(was_training)


def block_inputs(state: RunState, model: nn.Module, local: torch.Tensor, batch: int, max_memory: Optional[int],
                 resume: bool) -> tuple[list, bool, int]:
    """The calibration inputs of the first block to compress: ``(chunks, spilled to host memory, its index)``."""
    t = time.perf_counter()
    if state.store is not None:
        state.store.fetch_front(state.device)
    try:
        chunks = capture_block_inputs(model, state.blocks, local, batch, state.device)
        state.per_block = per_block_kwargs(model, state.blocks, local, batch, state.device)  # None: block 0's for all
    finally:
        if state.store is not None:
            state.store.release_front()
    state.time("capture_s", time.perf_counter() - t)
    act_bytes = 2 * sum(hs.numel() * hs.element_size() for hs, _ in chunks)  # a block's inputs and outputs
    spill = max_memory is not None and act_bytes > max_memory
    if spill:
        chunks = [(hs.cpu(), kw) for hs, kw in chunks]
    logger.info("calibration activations: %.1f MB on %s%s", act_bytes / 2**20, "host memory" if spill else state.device,
                f" (over --max-memory {max_memory / 2**20:.1f} MB)" if spill else "")
    first = 0
    if state.ckpt is not None and resume:
        first = checkpoint.load(state)
        if first:
            t = time.perf_counter()
            chunks = checkpoint.replay(state, first, chunks, state.device, spill)
            state.time("resume_s", time.perf_counter() - t)
    elif state.ckpt is not None:
        checkpoint.clear(state)
    return chunks, spill, first


def compress_blocks(state: RunState, model: nn.Module, chunks: list, spill: bool, first: int,
                    progress: bool) -> list[dict]:
    """Every block from ``first`` on, then the lm_head; returns the smoothing factors for the report."""
    smoothed: list[dict] = []
    state.bar = Progress(progress, len(state.blocks), "SparseGPT")
    state.bar.update(first)
    try:
        for bi in range(first, len(state.blocks)):
            chunks = compress_block(state, bi, chunks, spill, smoothed)
            state.bar.update()
        if state.config.quantize_lm_head:
            factor = quantize_lm_head(state, model, chunks)
            if factor is not None:
                smoothed.append({"block": "lm_head", "max_abs_log2_factor": {"lm_head": factor}})
    finally:
        state.bar.close()
    return smoothed


class _OnDevice:
    """Chunks kept in host memory, each moved to the compute device when a forward needs it."""

    def __init__(self, chunks, device):
        self.chunks, self.device = chunks, device

    def __iter__(self):
        for hs, kw in self.chunks:
            yield hs.to(self.device), kw

    def __len__(self):
        return len(self.chunks)


def compress_block(state: RunState, bi: int, chunks: list, spill: bool, smoothed: list[dict]) -> list:
    """One block: fetched, smoothed, its layers compressed, checkpointed, put back. Returns its outputs."""
    block, config, device = state.blocks[bi], state.config, state.device
    orig_device = next(block.parameters()).device
    if state.per_block is not None:  # layers of several kinds: this block's own masks and position embeddings
        chunks = [(hs, state.per_block[ci][bi]) for ci, (hs, _) in enumerate(chunks)]
    if state.store is not None:
        state.store.fetch(bi, block, device)
    else:
        block.to(device)
    if state.smooth_alpha:
        smoothed.append(_smooth(state, bi, block, _OnDevice(chunks, device) if spill else chunks))
    todo = {k: v for k, v in ((f"{state.path}.{bi}.{n}", m) for n, m in block_linears(block).items())
            if is_selected(k, config.targets, config.ignore)}
    todo = moe.without_routers(block, f"{state.path}.{bi}", todo, state.experts)  # MoE routers stay dense
    probe = (chunks[0][0].to(device), chunks[0][1])
    groups = shared_input_groups(block, probe, todo) if todo else []
    del probe
    targets = (reconstruct.dense_targets(block, _OnDevice(chunks, device) if spill else chunks, device, spill)
               if config.reconstruct_steps and todo else None)
    # chunks stay paused mid-forward (one forward per block) unless only one chunk's activations may be alive
    outs = run_block(state, block, todo, groups, chunks, keep_paused=not spill and state.store is None,
                     device=device if spill else None)
    families.note_unreached(todo, state.records, state.rows)  # never called: left dense, listed in the report
    work = _OnDevice(chunks, device) if spill else chunks
    if moe.compress_block_experts(block, f"{state.path}.{bi}", work, state.experts):
        outs = moe.block_outputs(block, work, to_cpu=spill)
    if targets is not None:
        entry, outs = reconstruct.reconstruct(state, bi, block, chunks, targets, outs, spill)
        state.reconstructed.append(entry)
        del targets
    chunks = [(o.cpu() if spill else o, kw) for o, (_, kw) in zip(outs, chunks)]
    if state.store is None:
        block.to(orig_device)
    t = time.perf_counter()
    checkpoint.save(state, bi, block)
    state.time("checkpoint_s", time.perf_counter() - t)
    if state.store is not None:
        state.store.release(bi, block)
    return chunks


def _smooth(state: RunState, bi: int, block: nn.Module, chunks) -> dict:
    t = time.perf_counter()
    factors = smoothing.smooth_block(block, chunks, state.smooth_alpha, state.dist)
    if factors is None:
        raise ConfigError(
            f"smooth_alpha: block {state.path}.{bi} ({type(block).__name__}) has none of the Llama-style pairs it "
            "smooths (input_layernorm -> self_attn.q/k/v_proj, post_attention_layernorm -> "
            "mlp.gate/up_proj, mlp.up_proj -> mlp.down_proj, self_attn.v_proj -> self_attn.o_proj)")
    state.time("smooth_s", time.perf_counter() - t)
    return {"block": bi, "max_abs_log2_factor": factors}
