"""Block-wise reconstruction (``--reconstruct-steps``): after a block's layers are compressed, tune what the
compressed weights leave free so that the block's outputs match the dense block's on the calibration windows.

- The mask is fixed: only the kept weights move (their gradient is zero on the mask, and the mask is re-applied).
- With a quantization grid the integer codes are fixed and the group scales are tuned (``scale * (1 + a)``), then
  rounded to the storage dtype: every weight stays on its group's grid, and the records' scales stay the one
  source of truth.
- The targets are the dense block's outputs on the same inputs (the outputs of the blocks already compressed and
  tuned before it), computed once before the block is compressed. Adam, ``steps`` minibatches of ``batch``
  windows drawn with a generator seeded by ``seed`` and the block's index (deterministic, and the same on resume).
- Under torchrun every rank draws from its own windows and the gradients are averaged over the ranks.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn
from torch.func import functional_call

from ..anatomy import first_hidden, get_weight, set_weight
from ..config import ConfigError
from ..solver import expand_groups
from .blockrun import forward_only


@dataclass
class TunedLayer:
    """One compressed linear layer of the block: its module, its parameter's name inside the block, the kept
    weights, and with a grid its integer codes (``code - zero``) and group scales."""

    name: str
    param: str
    module: nn.Module
    keep: torch.Tensor  # [out, in] bool
    weight: torch.Tensor  # [out, in] float32: the compressed weight
    scales: Optional[torch.Tensor] = None  # [out, groups] float32 (values of the storage dtype)
    group_size: Optional[int] = None

    def __post_init__(self):
        self.transposed = type(self.module).__name__ == "Conv1D"
        self.var = torch.zeros_like(self.scales) if self.scales is not None else self.weight.clone()
        self.var.requires_grad_(True)
        if self.scales is not None:
            scale, _ = expand_groups(self.scales, self.scales, self.weight.shape[1], self.group_size)
            self.codes = torch.round(self.weight / torch.where(scale > 0, scale, torch.ones_like(scale))) * self.keep

    def current(self) -> torch.Tensor:
        """The layer's weight [out, in] from the tuned variables (differentiable)."""
        if self.scales is None:
            return self.var * self.keep
        s = self.scales * (1.0 + self.var)
        return self.codes * expand_groups(s, s, self.weight.shape[1], self.group_size)[0]

    def final(self, scale_dtype: torch.dtype) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The tuned weight and scales, exactly on the mask and the grid (scales rounded to ``scale_dtype``)."""
        with torch.no_grad():
            if self.scales is None:
                return (self.var * self.keep).detach(), None
            s = (self.scales * (1.0 + self.var)).to(scale_dtype).to(torch.float32)
            s = torch.where(s > 0, s, self.scales)  # a scale never turns sign or underflows
            return self.codes * expand_groups(s, s, self.weight.shape[1], self.group_size)[0], s


def tuned_layers(block: nn.Module, prefix: str, records: dict, scale_dtype: torch.dtype) -> list[TunedLayer]:
    """The block's compressed linear layers (those with a record), ready to tune."""
    out = []
    for rel, module in block.named_modules():
        rec = records.get(f"{prefix}.{rel}")
        if rec is None or not hasattr(module, "weight"):
            continue
        W = get_weight(module).detach().to(torch.float32)
        scales = rec.scales.to(torch.float32).to(W.device) if rec.scales is not None else None
        out.append(TunedLayer(name=rec.name, param=f"{rel}.weight", module=module, keep=W != 0, weight=W,
                              scales=scales, group_size=rec.group_size))
    return out


def _window_slice(value: Any, lo: int, hi: int, batch: int) -> Any:
    """A keyword argument cut to windows ``lo:hi`` of a chunk of ``batch`` windows (tensors whose first dimension
    is the batch; shared ones, of first dimension 1, as they are)."""
    if isinstance(value, torch.Tensor):
        return value[lo:hi] if value.dim() and value.shape[0] == batch and batch > 1 else value
    if isinstance(value, (tuple, list)):
        return type(value)(_window_slice(v, lo, hi, batch) for v in value)
    return value


def minibatch(chunks, targets, batch: int, gen: torch.Generator, device) -> tuple:
    """``batch`` consecutive windows of one chunk, both drawn from ``gen``: (inputs, kwargs, targets)."""
    sizes = [hs.shape[0] for hs, _ in chunks]
    ci = int(torch.randint(len(chunks), (1,), generator=gen))
    b = sizes[ci]
    take = min(batch, b)
    lo = int(torch.randint(b - take + 1, (1,), generator=gen))
    hs, kw = chunks[ci]
    kw = {k: _window_slice(v, lo, lo + take, b) for k, v in kw.items()}
    return hs[lo:lo + take].to(device), kw, targets[ci][lo:lo + take].to(device)


def relative_error(block: nn.Module, weights: dict, hs, kw, target) -> torch.Tensor:
    """``||block(hs) - target||^2 / ||target||^2`` with the block's weights replaced by ``weights``."""
    out = first_hidden(functional_call(block, weights, (hs,), kw)).float()
    t = target.float()
    return (out - t).pow(2).sum() / t.pow(2).sum().clamp(min=1e-30)


def check_backward(block: nn.Module, layers: list[TunedLayer], hs, kw, where: str) -> None:
    """A clear error when the block cannot run backward to its compressed weights."""
    try:
        with torch.enable_grad():
            loss = relative_error(block, {t.param: _param(t) for t in layers}, hs, kw, torch.zeros_like(hs) + 1)
            loss.backward()
    except Exception as e:  # noqa: BLE001 - any failure of the backward is the same user error
        raise ConfigError(f"reconstruct_steps: block {where} ({type(block).__name__}) cannot run backward "
                          f"({type(e).__name__}: {e}); use --reconstruct-steps 0") from None
    dead = [t.name for t in layers if t.var.grad is None]
    if dead:
        raise ConfigError(f"reconstruct_steps: block {where} ({type(block).__name__}): no gradient reaches "
                          f"{', '.join(dead)}; use --reconstruct-steps 0")
    for t in layers:
        t.var.grad = None


def _param(t: TunedLayer) -> torch.Tensor:
    w = t.current()
    return (w.t() if t.transposed else w).to(t.module.weight.dtype)


def tune_block(block: nn.Module, layers: list[TunedLayer], chunks, targets, *, steps: int, lr: float, batch: int,
               seed: int, device, dist: Any = None, scale_dtype: torch.dtype = torch.float16, where: str = "",
               reduce=None) -> dict:
    """Tune ``layers`` of ``block`` for ``steps`` minibatches; write the tuned weights into the modules. Returns
    ``{"loss_first", "loss_last", "steps", "seconds"}`` (the first and the mean of the last few step losses) and
    the tuned scales per layer name under ``"scales"``."""
    t0 = time.perf_counter()
    frozen = [(p, p.requires_grad) for p in block.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    try:
        hs, kw, _ = minibatch(chunks, targets, 1, torch.Generator().manual_seed(seed), device)
        check_backward(block, layers, hs, kw, where)
        losses = _adam(block, layers, chunks, targets, steps=steps, lr=lr, batch=batch, seed=seed, device=device,
                       reduce=reduce)
    finally:
        for p, req in frozen:
            p.requires_grad_(req)
    scales = {}
    for t in layers:
        w, s = t.final(scale_dtype)
        set_weight(t.module, w)
        if s is not None:
            scales[t.name] = s
    tail = losses[-max(1, len(losses) // 8):]
    return {"loss_first": losses[0], "loss_last": sum(tail) / len(tail), "steps": steps,
            "seconds": round(time.perf_counter() - t0, 3), "scales": scales}


def _adam(block, layers, chunks, targets, *, steps, lr, batch, seed, device, reduce) -> list[float]:
    """The optimisation loop: Adam on each layer's variables, the step size relative to its scale."""
    groups = [{"params": [t.var], "lr": lr if t.scales is not None else lr * float(t.weight[t.keep].abs().mean())}
              for t in layers]
    opt = torch.optim.Adam(groups, betas=(0.9, 0.999))
    gen = torch.Generator().manual_seed(seed)
    losses = []
    with torch.enable_grad():
        for _ in range(steps):
            hs, kw, tg = minibatch(chunks, targets, batch, gen, device)
            loss = relative_error(block, {t.param: _param(t) for t in layers}, hs, kw, tg)
            opt.zero_grad(set_to_none=False)
            loss.backward()
            for t in layers:
                if t.scales is None:
                    t.var.grad.mul_(t.keep)
                if reduce is not None:
                    reduce(t.var.grad)
            opt.step()
            losses.append(float(loss.detach()))
    return losses


def output_error(outs, targets) -> float:
    """Relative error ``sum ||out - target||^2 / sum ||target||^2`` over the chunks."""
    num = den = 0.0
    for o, t in zip(outs, targets):
        t = t.float()
        num += float((o.to(t.device).float() - t).pow(2).sum())
        den += float(t.pow(2).sum())
    return num / den if den > 0 else 0.0


def dense_targets(block: nn.Module, chunks, device, to_cpu: bool) -> list[torch.Tensor]:
    """The block's outputs on its dense weights, one per chunk (before its layers are compressed)."""
    outs = []
    with torch.no_grad():
        for hs, kw in chunks:
            o = first_hidden(block(hs.to(device), **kw))
            outs.append(o.cpu() if to_cpu else o)
    return outs


def reconstruct(state: Any, bi: int, block: nn.Module, chunks, targets, outs: list, spill: bool) -> tuple[dict, list]:
    """Tune block ``bi`` (its layers already compressed and recorded; ``outs`` its outputs) toward ``targets``; the
    records' scales are updated. Returns the block's report entry and its new outputs."""
    config = state.config
    prefix = f"{state.path}.{bi}"
    layers = tuned_layers(block, prefix, state.records, state.scale_dtype)
    if not layers:
        return {"block": bi, "layers": 0}, outs
    reduce = None
    if state.dist is not None:
        from .. import distributed as distmod

        def reduce(g, d=state.dist):
            g.copy_(distmod.all_reduce_sum(d, g) / d.world)
    before = output_error(outs, targets)
    del outs
    stats = tune_block(block, layers, chunks, targets, steps=config.reconstruct_steps, lr=config.reconstruct_lr,
                       batch=config.reconstruct_batch, seed=config.seed * 1_000_003 + bi, device=state.device,
                       scale_dtype=state.scale_dtype, where=prefix, reduce=reduce)
    for name, s in stats.pop("scales").items():
        state.records[name].scales = s.to(state.scale_dtype).cpu()
    outs = forward_only(block, chunks, state.device if spill else None)
    outs = [o.cpu() for o in outs] if spill else outs
    state.time("reconstruct_s", stats["seconds"])
    return {"block": bi, "layers": len(layers), "error_before": before, "error_after": output_error(outs, targets),
            **stats}, outs
