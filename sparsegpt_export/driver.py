"""Walk a Hugging Face decoder block by block and compress its linear layers with the solver.

Knows transformers' module shapes, nothing of file formats. The schedule:

1. capture the inputs of the first block (hidden states and every keyword argument: masks, position
   embeddings, cache off) by running the model up to it;
2. per block, on the compute device: every linear layer is compressed as soon as its calibration inputs are
   complete, and the block's forward goes on with the compressed weight. With all calibration windows in
   one forward this is a single pass per block in which each layer sees the outputs of the already
   compressed layers before it (attention inputs, attention output, MLP in, MLP out). When the windows must be
   chunked, the same order is kept by one (early-stopped) forward per group of layers that share an input;
3. the block's outputs on the compressed weights feed the next block.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from . import distributed as distmod
from . import capture, families, hostmem, moe
from . import smoothing
from .config import ConfigError, SparseGPTConfig, parse_pattern
from .families import UnsupportedModelError
from .quant import QuantSpec
from .solver import HessianAccumulator, SolveResult, SolverError, admm_prune, layer_error, quad_form, sparsegpt_solve

logger = logging.getLogger(__name__)


# Testing aid: the process exits at once (no cleanup, as if killed) right after the checkpoint of this block.
CRASH_ENV = "SPARSEGPT_EXPORT_CRASH_AFTER_BLOCK"


class _StopForward(Exception):
    pass


# ---------------------------------------------------------------------------------------------- model anatomy
# Where the decoder blocks live, for the architectures we know by name; anything else is found generically.
BLOCK_PATHS = (
    "model.layers",  # Llama, Mistral, Qwen2/3, Phi-3, Gemma, Granite, ...
    "model.decoder.layers",  # OPT
    "transformer.h",  # GPT-2, Falcon, GPT-J, BLOOM
    "gpt_neox.layers",  # GPT-NeoX / Pythia
    "model.language_model.layers",
)


def _get(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def get_weight(module: nn.Module) -> torch.Tensor:
    """The weight as [out_features, in_features] (GPT-2's Conv1D stores it transposed)."""
    w = module.weight.data
    return w.t() if type(module).__name__ == "Conv1D" else w


def set_weight(module: nn.Module, w: torch.Tensor) -> None:
    if type(module).__name__ == "Conv1D":
        w = w.t()
    module.weight.data.copy_(w.to(module.weight.dtype))


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ModuleList of transformer blocks and its dotted path; a clear error naming the class otherwise."""
    cfg = getattr(model, "config", None)
    if cfg is not None and getattr(cfg, "is_encoder_decoder", False):
        raise UnsupportedModelError(
            f"{type(model).__name__}: encoder-decoder models are not supported; sparsegpt-export compresses "
            "decoder-only causal LMs (Llama, Mistral, Qwen, Phi, Gemma, OPT, GPT-2, GPT-NeoX, Falcon, ...)"
        )
    for path in BLOCK_PATHS:
        blocks = _get(model, path)
        if isinstance(blocks, nn.ModuleList) and len(blocks) > 0:
            return path, blocks
    # generic: the longest ModuleList of identical modules that contain linear layers
    best: tuple[int, str, Optional[nn.ModuleList]] = (0, "", None)
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > best[0] and not any(w in name for w in families.NON_TEXT_PARTS):
            kinds = {type(m) for m in mod}
            if len(kinds) == 1 and any(is_linear(x) for x in mod[0].modules()):
                best = (len(mod), name, mod)
    if best[2] is None:
        raise UnsupportedModelError(
            f"{type(model).__name__}: no stack of transformer blocks with linear layers was found; "
            f"supported are decoder-only models whose blocks live in one of {list(BLOCK_PATHS)} or another "
            "ModuleList of identical blocks"
        )
    return best[1], best[2]


def block_linears(block: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in block.named_modules() if n and is_linear(m)}


def _selected(name: str, config: SparseGPTConfig) -> bool:
    if config.targets and not any(re.search(rx, name) for rx in config.targets):
        return False
    return not any(re.search(rx, name) for rx in config.ignore)


# ---------------------------------------------------------------------------------------------- records
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


@dataclass
class CompressionResult:
    records: dict[str, LayerRecord]
    report: dict[str, Any]
    config: SparseGPTConfig
    expert_records: dict[str, LayerRecord] = field(default_factory=dict)  # fused 3-D experts: <param>.<expert>


# ---------------------------------------------------------------------------------------------- helpers
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


def _available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def auto_batch_size(model: nn.Module, nsamples: int, seqlen: int, device: torch.device,
                    budget: Optional[float] = None) -> int:
    """How many calibration windows go through a block at once: all of them when the activations fit in
    ``budget`` bytes (default: 35% of the device's free memory)."""
    cfg = getattr(model, "config", None)
    hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", 1024)
    inter = getattr(cfg, "intermediate_size", None) or getattr(cfg, "n_inner", None) or 4 * hidden
    heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", 16)
    per_sample = seqlen * (8 * hidden + 4 * inter) * 4 + heads * seqlen * seqlen * 4
    budget = 0.35 * _available_bytes(device) if budget is None else budget
    return max(1, min(nsamples, int(budget // max(per_sample, 1))))


def _first_hidden(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)):
        return out[0]
    if hasattr(out, "hidden_states"):
        return out.hidden_states
    raise TypeError(f"unexpected block output type {type(out).__name__}")


@torch.no_grad()
def capture_block_inputs(model: nn.Module, blocks: nn.ModuleList, calib: torch.Tensor, batch: int, device: torch.device):
    """Run the model up to its first block for each chunk of windows: [(hidden_states, kwargs), ...]."""
    captured: list[tuple[torch.Tensor, dict]] = []

    def hook(_mod, args, kwargs):
        hs, kwargs = families.block_inputs(blocks[0], args, kwargs)
        captured.append((hs, {k: v for k, v in kwargs.items() if k not in ("past_key_value", "past_key_values", "cache", "layer_past")}))
        raise _StopForward

    block_params = {id(p) for p in blocks.parameters()} | {id(b) for b in blocks.buffers()}
    moved = []
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in block_params and t.device != device and t.device.type != "meta":
            moved.append((t, t.device))
            t.data = t.data.to(device)
    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for i in range(0, calib.shape[0], batch):
            ids = calib[i:i + batch].to(device)
            try:
                model(input_ids=ids, use_cache=False)
            except _StopForward:
                pass
            else:
                raise UnsupportedModelError(f"{type(model).__name__}: the forward never reached the first block")
    finally:
        handle.remove()
        for t, dev in moved:
            t.data = t.data.to(dev)
    return captured


def _hash_tensor(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------- the walk
class _Progress:
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

    def update(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


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
    with hostmem.reuse_freed_memory(store is None and device.type == "cpu"):
        return _compress(model, calib, config, device, progress=progress, checkpoint_dir=checkpoint_dir, resume=resume,
                         model_name=model_name, sensitivity_cache=sensitivity_cache, store=store, max_memory=max_memory)


def _compress(model, calib, config, device, *, progress, checkpoint_dir, resume, model_name, sensitivity_cache, store,
              max_memory) -> CompressionResult:
    t_start = time.perf_counter()
    families.check_supported(model)
    path, blocks = find_blocks(model)
    families.check_blocks(model, blocks)
    n, m = config.nm
    model_dtype = next(model.parameters()).dtype
    scale_dtype = resolve_scale_dtype(config, model_dtype)
    hdtype = torch.float64 if config.hessian_dtype == "float64" else torch.float32
    quant = QuantSpec(config.bits, config.group_size, config.sym, scale_dtype, config.clip_search) if config.bits else None
    if calib.dim() != 2:
        raise ConfigError(f"calibration: expected input_ids of shape [nsamples, seqlen], got {tuple(calib.shape)}")
    nsamples, seqlen = calib.shape
    d = distmod.current()
    if d is not None:
        distmod.check_same(d, arguments=json.dumps(config.to_dict(), sort_keys=True), **{"calibration data": _hash_tensor(calib)},
                           model=f"{model_name}|{type(model).__name__}|{len(blocks)}")
        progress = progress and d.is_main
    local = distmod.shard(calib, d)
    if config.calib_batch_size:
        batch = config.calib_batch_size
    elif store is not None and device.type == "cpu":
        # streaming from disk to save host memory: a chunk's block-forward activations stay about one block's size
        # (the windows then go through each block in chunks, one early-stopped forward per group of layers)
        block_bytes = sum(p.numel() for p in blocks[0].parameters()) * store.dtype.itemsize
        batch = auto_batch_size(model, local.shape[0], seqlen, device, budget=block_bytes)
    else:
        batch = auto_batch_size(model, local.shape[0], seqlen, device)
    logger.info("calibration: %d windows per block forward (%d chunks)", batch, -(-local.shape[0] // batch))
    was_training = model.training
    model.eval()
    use_cache = getattr(getattr(model, "config", None), "use_cache", None)
    if use_cache is not None:
        model.config.use_cache = False

    records: dict[str, LayerRecord] = {}
    rows: list[dict] = []
    prof = {"capture_s": 0.0, "hessian_s": 0.0, "solve_s": 0.0, "block_forward_s": 0.0, "checkpoint_s": 0.0}
    ckpt = Path(checkpoint_dir) if checkpoint_dir else None
    world = d.world if d is not None else 1
    run_key = hashlib.sha256(
        (json.dumps(config.to_dict(), sort_keys=True) + _hash_tensor(calib) + model_name + str(len(blocks))
         + (f"|world={world}" if world > 1 else "")).encode()
    ).hexdigest()[:16]

    t = time.perf_counter()
    if d is None or d.is_main:  # the scores need the whole calibration set: rank 0 plans, the others receive it
        plan = plan_layers(model, path, blocks, calib, config, progress=progress, model_name=model_name,
                           cache=config.sensitivity_cache or sensitivity_cache)
    if d is not None:
        plan = distmod.broadcast_json(d, plan if d.is_main else None, 0)
    prof["plan_s"] = time.perf_counter() - t
    if store is not None and ckpt is None:
        raise ConfigError("offload: streaming blocks from disk needs a checkpoint_dir to stage them in")
    if store is not None and config.quantize_lm_head:
        raise ConfigError("--quantize-lm-head is not supported with --offload disk yet; use --offload cpu")
    t = time.perf_counter()
    if store is not None:
        store.fetch_front(device)
    try:
        chunks = capture_block_inputs(model, blocks, local, batch, device)
        per_block = capture.per_block_kwargs(model, blocks, local, batch, device)  # None: block 0's for all
    finally:
        if store is not None:
            store.release_front()
    prof["capture_s"] = time.perf_counter() - t
    act_bytes = 2 * sum(hs.numel() * hs.element_size() for hs, _ in chunks)  # a block's inputs and outputs
    spill = max_memory is not None and act_bytes > max_memory
    if spill:
        chunks = [(hs.cpu(), kw) for hs, kw in chunks]
    where = "host memory" if spill else str(device)
    logger.info("calibration activations: %.1f MB on %s%s", act_bytes / 2**20, where,
                f" (over --max-memory {max_memory / 2**20:.1f} MB)" if spill else "")
    start_block = 0
    if ckpt is not None and resume:
        start_block = _load_checkpoint(ckpt, run_key, model, path, blocks, chunks, records, rows, d,
                                       load_weights=store is None)
    elif ckpt is not None and ckpt.exists():
        import shutil

        distmod.barrier(d, "the start-up barrier")  # every rank has checked for a checkpoint before it goes
        if d is None or d.is_main:
            shutil.rmtree(ckpt, ignore_errors=True)

    def layer_setup(lname: str, prune: bool) -> tuple[str, bool, int, int, float]:
        pattern = plan["pattern"].get(lname, config.pattern)
        prune = prune and config.prunes and pattern != "dense"
        ln, lm = parse_pattern(pattern) if prune else (0, 0)
        sparsity = plan["sparsity"].get(lname, config.sparsity) if prune else 0.0
        return pattern, prune, ln, lm, sparsity

    def solve(lname: str, module: nn.Module, H: torch.Tensor, prune: bool = True, split: Any = None) -> None:
        """Solve one layer; with ``split`` (the ranks), this rank solves its share of the rows and the shares are
        exchanged (only for row-separable problems: see ``_row_separable``)."""
        W = get_weight(module)
        rows_, cols = W.shape
        t0 = time.perf_counter()
        pattern, prune, ln, lm, sparsity = layer_setup(lname, prune)
        if prune and ln and cols % lm:
            msg = f"layer {lname}: {cols} input columns are not a multiple of M={lm}; left dense"
            if config.on_incompatible == "error":
                raise SolverError(f"layer {lname}: {cols} input columns are not a multiple of M={lm} for the {pattern} pattern")
            warnings.warn(msg)
            rows.append({"layer": lname, "pattern": "skipped", "warning": msg, "shape": [rows_, cols]})
            return
        res, extra = layer_result(lname, W, H, prune, ln, lm, sparsity, split)
        record(lname, module, res, extra, pattern, prune, t0)

    def layer_result(lname: str, W: torch.Tensor, H: torch.Tensor, prune: bool, ln: int, lm: int, sparsity: float,
                     split: Any = None, measure: bool = True) -> tuple[SolveResult, dict]:
        """The solved weight of one layer (or of stacked layers: ``measure=False``, their errors are the caller's)."""
        rows_, cols = W.shape
        common = dict(quant=quant, blocksize=config.blocksize, mask_blocksize=config.mask_blocksize, damp=config.damp,
                      fit_scales_to_kept=config.fit_scales_to_kept, refit_scales=config.refit_scales, name=lname)
        extra: dict[str, Any] = {}
        Wd = W.to(device)
        if prune and config.update == "admm":
            # the SparseGPT sweep (unquantized) is the reference, and the fixed mask when admm_mask is "obs"
            obs = sparsegpt_solve(Wd, H, sparsity=sparsity, n=ln, m=lm, saliency=config.saliency,
                                  **{**common, "quant": None, "refit_scales": False})
            steps = config.refine_steps
            Wa, mask = admm_prune(Wd, H, sparsity=sparsity, n=ln, m=lm, iters=steps, damp=config.damp,
                                  mask_steps=max(1, (3 * steps) // 4), name=lname,
                                  mask=obs.mask if config.admm_mask == "obs" else None)
            admm_err = layer_error(Wa, Wd.float(), H)
            extra = {"obs_rel_error": obs.rel_error, "admm_rel_error": admm_err,
                     "admm_error_reduction": (1.0 - admm_err / obs.rel_error) if obs.rel_error > 0 else 0.0}
            if quant is not None:
                res = sparsegpt_solve(Wa, H, mask=mask, **common)
                res.rel_error = layer_error(res.weight, Wd.float(), H)
            else:
                res = SolveResult(weight=Wa, mask=mask, damp=obs.damp, damp_escalations=obs.damp_escalations,
                                  rel_error=admm_err, dead_inputs=obs.dead_inputs)
        else:
            def sweep(Wp: torch.Tensor) -> SolveResult:
                if not (prune and quant is not None and config.quant_order == "after-mask"):
                    return sparsegpt_solve(Wp, H, sparsity=sparsity, n=ln, m=lm, saliency=config.saliency,
                                           measure=measure, **common)
                # the mask and the OBS update first, unquantized; then the kept weights quantized on that mask
                pruned = sparsegpt_solve(Wp, H, sparsity=sparsity, n=ln, m=lm, saliency=config.saliency,
                                         measure=False, **{**common, "quant": None, "refit_scales": False})
                out = sparsegpt_solve(pruned.weight, H, mask=pruned.mask, factor=pruned.factor, **common)
                pruned.factor = out.factor = None
                if measure:  # against the weights before both sweeps
                    out.error, out.norm = quad_form(out.weight, H, Wp), quad_form(Wp, H)
                    out.rel_error = out.error / out.norm if out.norm > 0 else 0.0
                out.damp, out.damp_escalations = pruned.damp, pruned.damp_escalations
                return out

            if split is not None:
                lo, hi = distmod.row_range(rows_, split)
                res = _gather_rows(split, sweep(Wd[lo:hi]), rows_, cols)
                extra = {"row_split_ranks": split.world}
            else:
                res = sweep(Wd)
        return res, extra

    def record(lname: str, module: nn.Module, res: SolveResult, extra: dict, pattern: str, prune: bool,
               t0: float) -> None:
        rows_, cols = res.weight.shape
        set_weight(module, res.weight)
        if store is not None:  # --offload disk: give the solve's freed scratch back now (it would pile up until the
            hostmem.trim()     # block ends, in heap holes that glibc returns only when trimmed)
        pattern = pattern if prune else "dense"
        achieved = res.mask.float().mean().item()
        records[lname] = LayerRecord(
            name=lname, shape=(rows_, cols), pattern=pattern, sparsity=achieved, bits=config.bits,
            group_size=(config.group_size if config.group_size and config.group_size < cols else None) if quant else None,
            sym=config.sym,
            scales=res.scales.to(scale_dtype).cpu() if res.scales is not None else None,
            zeros=res.zeros.to(torch.uint8).cpu() if (res.zeros is not None and not config.sym) else None,
        )
        if lname in plan["scores"]:
            extra["score"] = plan["scores"][lname]
        if lname in plan["sparsity"]:
            extra["allocated_sparsity"] = round(plan["sparsity"][lname], 6)
        rows.append({
            "layer": lname, "shape": [rows_, cols], "pattern": pattern, "sparsity": round(achieved, 6),
            "bits": config.bits, "group_size": config.group_size if quant else None,
            "rel_error": res.rel_error, "damp": res.damp, "damp_escalations": res.damp_escalations,
            "dead_inputs": res.dead_inputs, "time_s": round(time.perf_counter() - t0, 4), **extra,
        })
        if res.damp_escalations:
            logger.warning("layer %s: Cholesky failed, damping raised to %g", lname, res.damp)
        prof["solve_s"] += time.perf_counter() - t0

    def solve_stacked(members: list[tuple[str, nn.Module]], H: torch.Tensor, prune: bool = True) -> None:
        """Layers that share one input (q/k/v, gate/up): when their solve is row by row and alike (same pattern,
        sparsity and columns), one sweep over their rows stacked, which gives each row what its own layer's sweep
        would (N:M masks, grids and the OBS update are per row) in fewer column steps; else one by one."""
        setups = [layer_setup(ln, prune) for ln, _ in members]
        weights = [get_weight(mod) for _, mod in members]
        alike = len(members) > 1 and len(set(setups)) == 1 and len({w.shape[1] for w in weights}) == 1
        pattern, prune_, ln_, lm_, sparsity = setups[0]
        if not (alike and config.stack_shared_inputs and _row_separable(config, plan, [n for n, _ in members], prune)
                and not (prune_ and ln_ and weights[0].shape[1] % lm_)):
            for name, mod in members:
                solve(name, mod, H, prune)
            return
        t0 = time.perf_counter()
        res, extra = layer_result(members[0][0], torch.cat([w.to(device) for w in weights]), H, prune_, ln_, lm_,
                                  sparsity, measure=False)
        del weights
        each = (time.perf_counter() - t0) / len(members)
        lo = 0
        for name, mod in members:
            r = get_weight(mod).shape[0]
            part = SolveResult(weight=res.weight[lo:lo + r], mask=res.mask[lo:lo + r],
                               scales=res.scales[lo:lo + r] if res.scales is not None else None,
                               zeros=res.zeros[lo:lo + r] if res.zeros is not None else None,
                               damp=res.damp, damp_escalations=res.damp_escalations, dead_inputs=res.dead_inputs)
            W0 = get_weight(mod).to(device)
            part.error, part.norm = quad_form(part.weight, H, W0), quad_form(W0, H)
            part.rel_error = part.error / part.norm if part.norm > 0 else 0.0
            del W0
            record(name, mod, part, {**extra, "stacked_with": [n for n, _ in members if n != name]}, pattern, prune_,
                   time.perf_counter() - each)
            lo += r

    def solve_group(members: list[tuple[str, nn.Module]], acc: HessianAccumulator, prune: bool = True) -> None:
        """Solve layers that share one input. With several ranks: the Hessian is all-reduced, each rank solves its
        share of the layers, and every result is broadcast from the rank that solved it."""
        if d is None:
            solve_stacked(members, acc.H, prune)
            return
        H, _ = distmod.all_reduce_hessian(d, acc.H, acc.nsamples)
        shapes = [tuple(get_weight(mod).shape) for _, mod in members]
        sizes = [r * c * c for r, c in shapes]
        own = distmod.owners([ln for ln, _ in members], sizes, d.world)
        if _row_separable(config, plan, [ln for ln, _ in members], prune) and min(r for r, _ in shapes) >= 8 * d.world \
                and max(sum(sz for sz, o in zip(sizes, own) if o == r) for r in range(d.world)) * d.world > 1.2 * sum(sizes):
            # the layers do not share out evenly (one o_proj, or q/k/v on two ranks): every rank solves its rows of
            # each layer instead (N:M masks, grids and the OBS update are row by row, so the result is the same)
            for ln, mod in members:
                solve(ln, mod, H, prune, split=d)
            return
        for (ln, mod), r in zip(members, own):
            if r == d.rank:
                solve(ln, mod, H, prune)
        names = {ln for ln, _ in members}
        got = []
        for (ln, mod), r in zip(members, own):
            got.append(_share_result(d, r, ln, mod, records, rows))
        rows[:] = [x for x in rows if x.get("layer") not in names] + got

    experts = moe.ExpertsContext(solve=solve, selected=lambda n: _selected(n, config), records=records, expert_records={},
                                 rows=rows, log=[], params={}, hdtype=hdtype,
                                 reduce=None if d is None else (lambda H, n: distmod.all_reduce_hessian(d, H, n)))
    smoothed: list[dict] = []
    bar = _Progress(progress, len(blocks), "SparseGPT")
    shared_rel: Optional[list[list[str]]] = None  # one-pass schedule: layers that share an input, by block-relative name
    for _ in range(start_block):
        bar.update()
    try:
        for bi in range(start_block, len(blocks)):
            block = blocks[bi]
            if per_block is not None:  # layers of several kinds: this block's own masks and position embeddings
                chunks = [(hs, per_block[ci][bi]) for ci, (hs, _) in enumerate(chunks)]
            orig_device = next(block.parameters()).device
            if store is not None:
                store.fetch(bi, block, device)
            else:
                block.to(device)
            if config.smooth_alpha:
                t = time.perf_counter()
                factors = smoothing.smooth_block(block, _OnDevice(chunks, device) if spill else chunks,
                                                 config.smooth_alpha, d)
                if factors is None:
                    raise ConfigError(
                        f"smooth_alpha: block {path}.{bi} ({type(block).__name__}) has none of the Llama-style pairs it "
                        "smooths (input_layernorm -> self_attn.q/k/v_proj, post_attention_layernorm -> "
                        "mlp.gate/up_proj, mlp.up_proj -> mlp.down_proj, self_attn.v_proj -> self_attn.o_proj)")
                smoothed.append({"block": bi, "max_abs_log2_factor": factors})
                prof["smooth_s"] = prof.get("smooth_s", 0.0) + time.perf_counter() - t
            lins = {f"{path}.{bi}.{k}": v for k, v in block_linears(block).items()}
            todo = moe.without_routers(block, f"{path}.{bi}", {k: v for k, v in lins.items() if _selected(k, config)},
                                       experts)  # MoE routers stay dense
            t_block = time.perf_counter()
            hooks_time = [0.0]
            if len(chunks) == 1 and d is None and not spill:
                rel = {k[len(f"{path}.{bi}."):]: k for k in todo}
                if config.stack_shared_inputs:  # learned per block (hybrids mix layer kinds), checked in the pass
                    shared_rel = [[n[len(f"{path}.{bi}."):] for n in g]
                                  for g in shared_input_groups(block, chunks[0], todo)]
                groups = [[rel[r] for r in g if r in rel] for g in (shared_rel or [])]
                outs = [_one_pass(block, chunks[0], todo, solve, hdtype, prof, hooks_time, bar, groups,
                                  solve_stacked)]
            else:
                work = _OnDevice(chunks, device) if spill else chunks
                _staged(block, work, todo, solve_group, hdtype, prof, hooks_time, bar)
                outs = []
                with torch.no_grad():
                    for hs, kw in work:
                        o = _first_hidden(block(hs, **kw))
                        outs.append(o.cpu() if spill else o)
            prof["block_forward_s"] += time.perf_counter() - t_block - hooks_time[0]
            families.note_unreached(todo, records, rows)  # never called: left dense, listed in the report
            if moe.compress_block_experts(block, f"{path}.{bi}", _OnDevice(chunks, device) if spill else chunks, experts):
                outs = moe.block_outputs(block, _OnDevice(chunks, device) if spill else chunks, to_cpu=spill)
            chunks = [(o, kw) for o, (_, kw) in zip(outs, chunks)]
            if store is None:
                block.to(orig_device)
            if ckpt is not None:
                t = time.perf_counter()
                _save_checkpoint(ckpt, run_key, bi, path, block, chunks, records, rows, d)
                prof["checkpoint_s"] += time.perf_counter() - t
                if os.environ.get(CRASH_ENV) == str(bi):  # fault injection for the resume tests: die like a kill
                    logger.error("%s=%d: exiting right after the checkpoint of block %d", CRASH_ENV, bi, bi)
                    os._exit(75)
            if store is not None:
                store.release(bi, block)
            bar.update()
        if config.quantize_lm_head:
            t = time.perf_counter()
            head_factor = _quantize_lm_head(model, chunks, solve_group, hdtype, device, config.lm_head_smoothing, d)
            if head_factor is not None:
                smoothed.append({"block": "lm_head", "max_abs_log2_factor": {"lm_head": head_factor}})
            prof["lm_head_s"] = time.perf_counter() - t
    finally:
        bar.close()
        if use_cache is not None:
            model.config.use_cache = use_cache
        model.train(was_training)

    pruned = [r for r in rows if r.get("pattern") not in ("skipped",)]
    # the sparsity is the pruned layers' (a quantized-only lm_head does not dilute it; layers kept dense by
    # dense_fraction do count, with sparsity 0)
    sparse_rows = [r for r in pruned if r["pattern"] != "dense" or not config.prunes or r["layer"] in plan["pattern"]]
    total_w = sum(r["shape"][0] * r["shape"][1] for r in sparse_rows)
    report = {
        "model": model_name,
        "config": config.to_dict(),
        "blocks_path": path,
        "num_blocks": len(blocks),
        "nsamples": int(nsamples),
        "world_size": world,
        "seqlen": int(seqlen),
        "calib_batch_size": int(batch),
        "activations": "host" if spill else "device",
        "offload": "disk" if store is not None else None,
        "device": str(device),
        "scale_dtype": str(scale_dtype).replace("torch.", ""),
        "layers": rows,
        "summary": {
            "layers_compressed": len(pruned),
            "layers_skipped": len(rows) - len(pruned),
            "weighted_sparsity": (sum(r["sparsity"] * r["shape"][0] * r["shape"][1] for r in sparse_rows) / total_w) if total_w else 0.0,
            "mean_rel_error": (sum(r["rel_error"] for r in pruned) / len(pruned)) if pruned else 0.0,
            "wall_s": round(time.perf_counter() - t_start, 3),
        },
        "profile": {k: round(v, 3) for k, v in prof.items()},
        "warnings": [r["warning"] for r in rows if "warning" in r] + plan["notes"],
    }
    if experts.log or experts.params or experts.routers:
        report["moe"] = moe.report(experts)
    if config.smooth_alpha or smoothed:
        report["smoothing"] = {"alpha": config.smooth_alpha, "windows": smoothing.WINDOWS, "blocks": smoothed}
        if config.quantize_lm_head:
            report["smoothing"]["lm_head_alpha"] = config.lm_head_smoothing
    if plan["method"]:
        report["allocation"] = {k: plan.get(k) for k in ("method", "sensitivity", "cache", "notes", "dense", "mixed")}
    if config.update == "admm":
        done = [r for r in rows if "admm_rel_error" in r]
        report["summary"]["admm_error_reduction_mean"] = (
            sum(r["admm_error_reduction"] for r in done) / len(done)) if done else 0.0
    return CompressionResult(records=records, report=report, config=config, expert_records=experts.expert_records)


def selected_layers(path: str, blocks: nn.ModuleList, config: SparseGPTConfig) -> dict[str, nn.Module]:
    """Every linear layer the run compresses, by its full name, in block order."""
    return {f"{path}.{bi}.{k}": v for bi, block in enumerate(blocks) for k, v in block_linears(block).items()
            if _selected(f"{path}.{bi}.{k}", config)}


def plan_layers(model: nn.Module, path: str, blocks: nn.ModuleList, calib: torch.Tensor, config: SparseGPTConfig, *,
                progress: bool = False, model_name: str = "", cache: Optional[str | os.PathLike] = None) -> dict:
    """Per-layer sparsity and pattern when the config asks for more than one for all (``allocation``,
    ``dense_fraction``, ``mix_pattern``), from the sensitivity scores or OWL's outlier ratios of the dense model.
    Runs on the device the model is loaded on. Returns ``{"sparsity", "pattern", "scores", "notes", ...}``."""
    from . import sensitivity as sens

    plan: dict[str, Any] = {"sparsity": {}, "pattern": {}, "scores": {}, "notes": [], "method": None,
                            "sensitivity": None, "dense": [], "mixed": []}
    nm = config.nm[0] > 0
    if config.allocation == "uniform" and not config.dense_fraction and not config.mix_fraction:
        return plan
    layers = selected_layers(path, blocks, config)
    names = list(layers)
    numel = {k: get_weight(v).numel() for k, v in layers.items()}
    plan["method"] = config.allocation if not nm else "nm-choice"
    stats = None
    if config.allocation == "owl" or (config.sensitivity == "proxy" and config.allocation != "owl"):
        stats = sens.input_statistics(model, names, calib, progress=progress)
    if config.allocation == "owl":
        by_block: dict[str, list[str]] = {}
        for k in names:
            by_block.setdefault(sens.block_of(k, path), []).append(k)
        outliers = {b: sens.outlier_ratio([get_weight(layers[k]) for k in ks], [stats[k] for k in ks], config.owl_m)
                    for b, ks in by_block.items()}
        plan["scores"] = {k: outliers[sens.block_of(k, path)] for k in names}
        plan["sparsity"], notes = sens.allocate("owl", config.sparsity, numel, blocks={k: sens.block_of(k, path) for k in names},
                                                outliers=outliers, owl_lambda=config.owl_lambda)
        plan["notes"] += notes
        return plan

    def compute():
        return sens.estimate(model, names, calib, method=config.sensitivity, probes=config.probes, seed=config.seed,
                             progress=progress, stats=stats)

    plan["sensitivity"] = config.sensitivity
    if cache:
        scores, note = sens.cached_scores(Path(cache), sens.model_signature(model, names, model_name), config.sensitivity,
                                          config.probes, config.seed, _hash_tensor(calib), compute)
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
    dense = sens.nm_choice(scores, config.dense_fraction) if config.dense_fraction else []
    rest = {k: v for k, v in scores.items() if k not in dense}
    mixed = sens.nm_choice(rest, config.mix_fraction) if config.mix_fraction else []
    plan["dense"], plan["mixed"] = dense, mixed
    plan["pattern"] = {k: "dense" if k in dense else (config.mix_pattern if k in mixed else config.pattern) for k in names}
    return plan


class _OnDevice:
    """Chunks kept in host memory, each moved to the compute device when a forward needs it."""

    def __init__(self, chunks, device):
        self.chunks, self.device = chunks, device

    def __iter__(self):
        for hs, kw in self.chunks:
            yield hs.to(self.device), kw

    def __len__(self):
        return len(self.chunks)


def shared_input_groups(block: nn.Module, chunk, todo: dict[str, nn.Module]) -> list[list[str]]:
    """The layers of ``todo`` that read one and the same input tensor (q/k/v, gate/up), in call order, from a
    forward of the block on the first window of ``chunk`` (the weights are not touched). Layers that share
    nothing form groups of one. Keyword tensors whose first dimension is the batch are cut to the window too."""
    seen: list[tuple[str, tuple]] = []
    alive: list[torch.Tensor] = []  # inputs held for the forward: no later tensor can reuse their address
    handles = [mod.register_forward_pre_hook(
        lambda _m, args, name=name: (seen.append((name, (args[0].data_ptr(), tuple(args[0].shape)))),
                                     alive.append(args[0]))[0] and None)
        for name, mod in todo.items()]
    hs, kw = chunk
    b = hs.shape[0]

    def cut(v):
        if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == b and b > 1:
            return v[:1]
        if isinstance(v, tuple):
            return tuple(cut(t) for t in v)
        return v

    try:
        with torch.no_grad():
            try:
                block(hs[:1], **{k: cut(v) for k, v in kw.items()})
            except RuntimeError:  # keyword tensors that do not lead with the batch (ALiBi: batch x heads): all of it
                seen.clear()
                alive.clear()
                block(hs, **kw)
    finally:
        for h in handles:
            h.remove()
    groups: list[list[str]] = []
    last = None
    for name, key in seen:
        if groups and key == last and name not in groups[-1]:
            groups[-1].append(name)
        elif not any(name in g for g in groups):
            groups.append([name])
        last = key
    return groups


def _one_pass(block, chunk, todo, solve, hdtype, prof, hooks_time, bar, groups=None, solve_many=None) -> torch.Tensor:
    """All windows at once: each layer is solved in its pre-hook, so the forward continues on compressed weights.
    ``groups`` (lists of the names in ``todo`` that share an input, from ``shared_input_groups``): such a group is
    solved at once by ``solve_many`` in the pre-hook of its first layer; the others' hooks check that they do get
    the same input."""
    cache: dict = {}
    handles = []
    group_of = {n: g for g in (groups or []) if len(g) > 1 and solve_many is not None for n in g}
    solved: dict[str, tuple] = {}

    def make_hook(lname):
        def hook(mod, args):
            t0 = time.perf_counter()
            x = args[0]
            key = (x.data_ptr(), tuple(x.shape))
            if lname in solved:
                if solved[lname] != key:
                    raise SolverError(
                        f"layer {lname}: it was solved with {group_of[lname][0]}, whose input it shared in the "
                        "first block, but here its input differs; rerun with --no-stack-shared-inputs")
                hooks_time[0] += time.perf_counter() - t0
                return
            if cache.get("key") != key:
                cache.clear()
                th = time.perf_counter()
                acc = HessianAccumulator(x.shape[-1], device=x.device, dtype=hdtype, name=lname)
                acc.add(x)
                prof["hessian_s"] += time.perf_counter() - th
                cache.update(key=key, x=x, H=acc.H)
            bar.postfix(lname.rsplit(".", 2)[-2] + "." + lname.rsplit(".", 1)[-1])
            grp = group_of.get(lname)
            if grp is not None and grp[0] == lname:
                solve_many([(n, todo[n]) for n in grp], cache["H"])
                solved.update({n: key for n in grp})
            else:
                solve(lname, mod, cache["H"])
            hooks_time[0] += time.perf_counter() - t0
        return hook

    for lname, mod in todo.items():
        handles.append(mod.register_forward_pre_hook(make_hook(lname)))
    hs, kw = chunk
    try:
        with torch.no_grad():
            out = _first_hidden(block(hs, **kw))
    finally:
        for h in handles:
            h.remove()
        cache.clear()
    return out


def _staged(block, chunks, todo, solve_group, hdtype, prof, hooks_time, bar) -> None:
    """Windows in chunks (or on several ranks): per group of layers sharing an input, one early-stopped forward over
    all chunks, then ``solve_group(members, accumulator)``."""
    remaining = dict(todo)
    while remaining:
        members: list[str] = []
        acc_box: dict = {}
        first_chunk = [True]

        def make_hook(lname):
            def hook(mod, args):
                if lname not in remaining:
                    return
                t0 = time.perf_counter()
                x = args[0]
                key = (x.data_ptr(), tuple(x.shape))
                if acc_box.get("key") is None:
                    # keep the input alive for the rest of this forward: no later tensor can then be allocated at
                    # its address, so an equal key means the same input (not a freed one's memory reused)
                    acc_box["key"], acc_box["x"] = key, x
                    if "acc" not in acc_box:
                        acc_box["acc"] = HessianAccumulator(x.shape[-1], device=x.device, dtype=hdtype, name=lname)
                    th = time.perf_counter()
                    acc_box["acc"].add(x)
                    prof["hessian_s"] += time.perf_counter() - th
                elif acc_box["key"] != key:
                    hooks_time[0] += time.perf_counter() - t0
                    raise _StopForward
                if first_chunk[0]:
                    members.append(lname)
                elif lname not in members:
                    hooks_time[0] += time.perf_counter() - t0
                    raise _StopForward
                hooks_time[0] += time.perf_counter() - t0
            return hook

        handles = [mod.register_forward_pre_hook(make_hook(ln)) for ln, mod in todo.items()]
        try:
            with torch.no_grad():
                for hs, kw in chunks:
                    acc_box["key"] = None
                    acc_box.pop("x", None)
                    try:
                        block(hs, **kw)
                    except _StopForward:
                        pass
                    first_chunk[0] = False
        finally:
            acc_box.pop("x", None)
            for h in handles:
                h.remove()
        if not members:
            for ln in remaining:
                warnings.warn(f"layer {ln}: never called in the block's forward; left dense")
            break
        t0 = time.perf_counter()
        bar.postfix(",".join(ln.rsplit(".", 1)[-1] for ln in members))
        solve_group([(ln, remaining.pop(ln)) for ln in members], acc_box["acc"])
        hooks_time[0] += time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------- the lm_head
# What sits between the last block and the lm_head: the final norm (and OPT's optional projection).
FINAL_NORM_PATHS = (
    "model.norm", "model.decoder.final_layer_norm", "transformer.ln_f", "gpt_neox.final_layer_norm",
    "model.final_layernorm", "model.language_model.norm",
)


def untie_lm_head(model: nn.Module) -> bool:
    """Give the lm_head its own weight when it shares the embedding's; True when it was tied."""
    lm, emb = model.get_output_embeddings(), model.get_input_embeddings()
    if lm is None or emb is None or lm.weight.data_ptr() != emb.weight.data_ptr():
        return False
    lm.weight = nn.Parameter(lm.weight.detach().clone(), requires_grad=False)
    for cfg in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        cfg.tie_word_embeddings = False
    return True


@torch.no_grad()
def _quantize_lm_head(model: nn.Module, chunks, solve_group, hdtype, device, smooth_alpha: float = 0.0,
                      d: Optional["distmod.Dist"] = None) -> Optional[float]:
    """Quantize (never prune) the lm_head, its Hessian from the final norm's outputs on the compressed blocks;
    with ``smooth_alpha``, the final norm -> lm_head pair is smoothed first (returns its largest log2 factor)."""
    lm = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if lm is None or not isinstance(lm, nn.Linear):
        raise UnsupportedModelError(f"{type(model).__name__}: --quantize-lm-head: no nn.Linear output embedding (lm_head) found")
    norm = next((m for m in (_get(model, p) for p in FINAL_NORM_PATHS) if isinstance(m, nn.Module)), None)
    if norm is None:
        raise UnsupportedModelError(
            f"{type(model).__name__}: --quantize-lm-head: cannot find the final norm before the lm_head "
            f"(looked for {list(FINAL_NORM_PATHS)})"
        )
    tail = [norm] + [m for m in [_get(model, "model.decoder.project_out")] if isinstance(m, nn.Module)]
    untie_lm_head(model)
    moved = [(m, next(m.parameters(), torch.empty(0)).device) for m in tail + [lm]]
    for mod, _ in moved:
        mod.to(device)
    factor = None
    try:
        if smooth_alpha and len(tail) == 1:
            factor = smoothing.smooth_head(norm, lm, (hs for hs, _ in chunks), smooth_alpha, d=d)
        acc = HessianAccumulator(lm.in_features, device=device, dtype=hdtype, name="lm_head")
        for hs, _ in chunks:
            x = hs
            for mod in tail:
                x = mod(x)
            acc.add(x)
        name = next(n for n, mod in model.named_modules() if mod is lm)
        solve_group([(name, lm)], acc, prune=False)
    finally:
        for mod, dev in moved:
            mod.to(dev)
    return factor


# ---------------------------------------------------------------------------------------------- several ranks
def _row_separable(config: SparseGPTConfig, plan: dict, names: list[str], prune: bool) -> bool:
    """Whether the solve of these layers is row by row: N:M masks (or no pruning) with the OBS sweep. Unstructured
    masks rank the weights of all rows together, and ADMM's gradual mask does too."""
    if not (prune and config.prunes):
        return True
    if config.update != "obs":
        return False
    return all(plan["pattern"].get(ln) == "dense" or parse_pattern(plan["pattern"].get(ln, config.pattern))[0] > 0
               for ln in names)


def _gather_rows(d: "distmod.Dist", part: SolveResult, rows: int, cols: int) -> SolveResult:
    """The whole layer's result from every rank's share of its rows (broadcast share by share, in rank order)."""
    weights, masks, scales, zeros = [], [], [], []
    err = torch.tensor([part.error, part.norm], dtype=torch.float64)
    total = distmod.all_reduce_sum(d, err)
    for r in range(d.world):
        lo, hi = distmod.row_range(rows, distmod.Dist(r, d.world, d.device))
        mine = r == d.rank
        weights.append(distmod.broadcast_tensor(d, part.weight if mine else torch.empty(hi - lo, cols), r))
        masks.append(distmod.broadcast_tensor(
            d, part.mask.to(torch.uint8) if mine else torch.empty(hi - lo, cols, dtype=torch.uint8), r).bool())
        if part.scales is not None:
            g = part.scales.shape[1]
            scales.append(distmod.broadcast_tensor(d, part.scales if mine else torch.empty(hi - lo, g), r))
            zeros.append(distmod.broadcast_tensor(d, part.zeros if mine else torch.empty(hi - lo, g), r))
    num, den = float(total[0]), float(total[1])
    return SolveResult(
        weight=torch.cat(weights).to(part.weight.device), mask=torch.cat(masks).to(part.mask.device),
        scales=torch.cat(scales) if scales else None, zeros=torch.cat(zeros) if zeros else None,
        damp=part.damp, damp_escalations=part.damp_escalations, rel_error=num / den if den > 0 else 0.0,
        seconds=part.seconds, dead_inputs=part.dead_inputs, error=num, norm=den)


def _share_result(d: "distmod.Dist", src: int, lname: str, module: nn.Module, records: dict, rows: list) -> dict:
    """Broadcast one solved layer (weight, record with scales and zeros, report row) from rank ``src``; every rank
    ends with the same weight and record. Returns the row."""
    mine = d.rank == src
    rec = records.get(lname) if mine else None
    meta = None
    if mine:
        meta = {"row": next(x for x in reversed(rows) if x.get("layer") == lname),
                "record": None if rec is None else {
                    **{k: v for k, v in vars(rec).items() if k not in ("scales", "zeros")},
                    "scales": None if rec.scales is None else [list(rec.scales.shape), str(rec.scales.dtype)[6:]],
                    "zeros": None if rec.zeros is None else list(rec.zeros.shape)}}
    meta = distmod.broadcast_json(d, meta, src)
    w = module.weight.data
    got = distmod.broadcast_tensor(d, w.float() if d.device.type == "cpu" else w, src)
    if not mine:
        w.copy_(got.to(w.dtype))
    r = meta["record"]
    if r is not None:
        scales = zeros = None
        if r["scales"] is not None:
            shape, dtype = r["scales"]
            buf = rec.scales.float() if mine else torch.empty(shape, dtype=torch.float32)
            scales = distmod.broadcast_tensor(d, buf, src).to(getattr(torch, dtype))
        if r["zeros"] is not None:
            buf = rec.zeros if mine else torch.empty(r["zeros"], dtype=torch.uint8)
            zeros = distmod.broadcast_tensor(d, buf, src)
        if not mine:
            records[lname] = LayerRecord(**{**r, "shape": tuple(r["shape"]), "scales": scales, "zeros": zeros})
    return meta["row"]


# ---------------------------------------------------------------------------------------------- checkpoints
def _inputs_file(ckpt: Path, d: Optional["distmod.Dist"], next_block: int) -> Path:
    rank = d.rank if d is not None else 0
    return ckpt / f"inputs.rank{rank}.block{next_block:05d}.safetensors"


def _save_checkpoint(ckpt: Path, run_key: str, bi: int, path: str, block: nn.Module, chunks, records, rows,
                     d: Optional["distmod.Dist"] = None) -> None:
    """After block ``bi``: each rank keeps its own block outputs (versioned by block, so a crash between the files
    never pairs new inputs with an old state); rank 0 then keeps the block's weights, records and the state."""
    from safetensors.torch import save_file

    ckpt.mkdir(parents=True, exist_ok=True)
    acts = {f"hidden_{i}": hs.detach().cpu().contiguous() for i, (hs, _) in enumerate(chunks)}
    target = _inputs_file(ckpt, d, bi + 1)
    tmp = target.with_suffix(".tmp")
    save_file(acts, str(tmp))
    os.replace(tmp, target)
    distmod.barrier(d, f"the checkpoint after block {bi}")
    if d is None or d.is_main:
        _save_block_state(ckpt, run_key, bi, path, block, records, rows)
    distmod.barrier(d, f"the checkpoint after block {bi}")
    old = _inputs_file(ckpt, d, bi)
    if old.exists():
        old.unlink()


def _save_block_state(ckpt: Path, run_key: str, bi: int, path: str, block: nn.Module, records, rows) -> None:
    from safetensors.torch import save_file

    # the block's weights under their checkpoint names (with --offload disk this file becomes an output shard), and
    # its layers' scales and zero points beside it
    prefix = f"{path}.{bi}."
    tensors = {prefix + k: v.detach().cpu().contiguous() for k, v in block.state_dict().items()}
    quant: dict[str, torch.Tensor] = {}
    for name, rec in records.items():
        if name.startswith(prefix):
            if rec.scales is not None:
                quant[name + ".scales"] = rec.scales.contiguous()
            if rec.zeros is not None:
                quant[name + ".zeros"] = rec.zeros.contiguous()
    for fname, data in ((f"quant_{bi:05d}.safetensors", quant), (f"block_{bi:05d}.safetensors", tensors)):
        tmpb = ckpt / (fname + ".tmp")
        save_file(data, str(tmpb))
        os.replace(tmpb, ckpt / fname)
    meta = {
        "run_key": run_key, "next_block": bi + 1, "rows": rows,
        "records": {n: {k: v for k, v in vars(r).items() if k not in ("scales", "zeros")} for n, r in records.items()},
    }
    tmpj = ckpt / "state.json.tmp"
    tmpj.write_text(json.dumps(meta))
    os.replace(tmpj, ckpt / "state.json")


def _load_checkpoint(ckpt: Path, run_key: str, model, path, blocks, chunks, records, rows,
                     d: Optional["distmod.Dist"] = None, load_weights: bool = True) -> int:
    from safetensors.torch import load_file

    state_f = ckpt / "state.json"
    if not state_f.exists():
        logger.warning("--resume: no checkpoint in %s; starting from the first block", ckpt)
        return 0
    meta = json.loads(state_f.read_text())
    if meta.get("run_key") != run_key:
        raise ConfigError(
            f"--resume: the checkpoint in {ckpt} was made with another model, configuration, calibration data or number of ranks; "
            "remove it or run without --resume"
        )
    nb = int(meta["next_block"])
    saved: dict[str, torch.Tensor] = {}
    for bi in range(nb):
        if load_weights:
            t = load_file(str(ckpt / f"block_{bi:05d}.safetensors"))
            prefix = f"{path}.{bi}."
            blocks[bi].load_state_dict({k[len(prefix):]: v for k, v in t.items()}, strict=True)
        saved.update(load_file(str(ckpt / f"quant_{bi:05d}.safetensors")))
    for name, r in meta["records"].items():
        rec = LayerRecord(**{**r, "shape": tuple(r["shape"])})
        rec.scales = saved.get(name + ".scales")
        rec.zeros = saved.get(name + ".zeros")
        records[name] = rec
    rows.extend(meta["rows"])
    f = _inputs_file(ckpt, d, nb)
    if not f.is_file():
        raise ConfigError(f"--resume: {f} is missing from the checkpoint in {ckpt} (was the run started with another "
                          "number of ranks?); remove the checkpoint or run without --resume")
    acts = load_file(str(f))
    if len(acts) != len(chunks):
        raise ConfigError(f"--resume: {f} holds {len(acts)} chunks of activations, this run has {len(chunks)} "
                          "(another --calib-batch-size?); use the same arguments as the interrupted run")
    for i in range(len(chunks)):
        hs = acts[f"hidden_{i}"].to(chunks[i][0].device)
        chunks[i] = (hs, chunks[i][1])
    logger.info("resumed from block %d", nb)
    return nb
