"""Mixture-of-experts layers whose experts are fused into 3-D parameters, compressed expert by expert.

transformers 5 keeps the experts of most MoE families (Mixtral, Qwen3-MoE, gpt-oss, DeepSeek, OLMoE, ...) in an
``experts`` module holding ``gate_up_proj`` / ``down_proj`` as parameters of shape [num_experts, ., .], applied with
``F.linear(x, W[e])`` (rows = outputs) or ``x @ W[e]`` (gpt-oss: rows = inputs). A walk over ``nn.Linear`` modules never
sees them; this module compresses each expert's matrices with SparseGPT, after the block's linear layers:

1. the experts module's call arguments (hidden states, routing indices and weights) are captured by a forward of
   the block on the calibration windows (attention already compressed);
2. stage by stage (the matrices that read one input: ``gate_up_proj``, then ``down_proj`` on the compressed
   ``gate_up_proj``'s output) the module is run on those arguments with a ``TorchFunctionMode`` that sees each
   ``F.linear`` / ``matmul`` on a slice ``W[e]`` and adds its input rows, the tokens routed to expert ``e``, to that
   expert's Hessian;
3. each expert matrix is solved with its own Hessian through the driver's ``solve`` (same pattern, grid and report
   row as any layer), its name ``<module>.<param>.<e>``;
4. an expert routed fewer than ``MIN_TOKENS`` calibration tokens is solved with the Hessian of all the tokens that
   entered the MoE layer, run through that expert (the routing replaced by "every token to every expert"); when the
   routing arguments cannot be recognised it is left dense. Both are listed in ``report["moe"]``.

The experts run with transformers' ``eager`` experts implementation while this happens (the per-expert loop).
Router weights are never touched (they are parameters of router modules, not expert matrices).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .solver import HessianAccumulator

MIN_TOKENS = 16
FALLBACK = (f"an expert routed fewer than {MIN_TOKENS} calibration tokens is solved with the Hessian of all the tokens "
            "entering its MoE layer, run through that expert")


class _Stop(Exception):
    pass


# ---------------------------------------------------------------------------------------------- discovery
def fused_experts(block: nn.Module) -> dict[str, nn.Module]:
    """The modules of ``block`` holding their experts as 3-D parameters [num_experts, ., .], by name."""
    out = {}
    for name, mod in block.named_modules():
        if fused_params(mod):
            out[name] = mod
    return out


def fused_params(mod: nn.Module) -> dict[str, nn.Parameter]:
    e = getattr(mod, "num_experts", None)
    if not isinstance(e, int):
        return {}
    return {n: p for n, p in mod.named_parameters(recurse=False) if p.dim() == 3 and p.shape[0] == e}


def count_fused_matrices(block: nn.Module) -> int:
    return sum(p.shape[0] for m in fused_experts(block).values() for p in fused_params(m).values())


def _num_experts(mod: nn.Module) -> Optional[int]:
    """The number of experts of a MoE module (one with an ``experts`` child: fused, or a ModuleList), else None."""
    experts = getattr(mod, "experts", None)
    if isinstance(experts, nn.ModuleList):
        return len(experts)
    if isinstance(experts, nn.Module) and isinstance(getattr(experts, "num_experts", None), int):
        return experts.num_experts
    return None


def routers(block: nn.Module) -> list[str]:
    """The linear layers of ``block`` that route tokens: outside the experts, in a MoE module, with one output per
    expert (or a single output named ``*gate*``: a shared expert's gate). They are left dense."""
    out = []
    for name, mod in block.named_modules():
        n = _num_experts(mod)
        if n is None:
            continue
        for cname, child in mod.named_modules():
            if not cname or cname == "experts" or cname.startswith("experts."):
                continue
            if isinstance(child, nn.Linear) and (child.out_features == n or (child.out_features == 1 and "gate" in cname)):
                out.append(f"{name}.{cname}" if name else cname)
    return out


def without_routers(block: nn.Module, prefix: str, todo: dict, ctx: "ExpertsContext") -> dict:
    """``todo`` (full name -> linear layer) less the block's routers, which are listed in ``ctx.routers``."""
    names = {f"{prefix}.{r}" for r in routers(block)}
    ctx.routers.extend(sorted(n for n in names if n in todo))
    return {k: v for k, v in todo.items() if k not in names}


# ---------------------------------------------------------------------------------------------- watching W[e]
class ExpertMatrix:
    """One expert's matrix as the driver's ``solve`` sees a layer: ``weight`` [out, in], a view into the 3-D
    parameter (writes go through)."""

    def __init__(self, view: torch.Tensor):
        self.weight = view


@dataclass
class _Stage:
    """What one pass over the calibration windows saw: per (param, expert) a Hessian and a token count."""
    params: dict[str, nn.Parameter]
    hdtype: torch.dtype
    only: Optional[set] = None  # (param, expert) pairs to accumulate; None: all
    acc: dict = field(default_factory=dict)
    tokens: dict = field(default_factory=dict)
    transposed: dict = field(default_factory=dict)
    first: dict = field(default_factory=dict)  # expert -> key of the input that opened its stage in this call
    alive: list = field(default_factory=list)
    unsupported: Optional[str] = None

    def locate(self, w: Any) -> Optional[tuple[str, int, bool]]:
        """(param name, expert, transposed) when ``w`` is one expert's slice of a watched parameter."""
        if not isinstance(w, torch.Tensor) or w.dim() != 2:
            return None
        for name, p in self.params.items():
            start, size = p.data_ptr(), p.numel() * p.element_size()
            if start <= w.data_ptr() < start + size:
                e = (w.data_ptr() - start) // (p.stride(0) * p.element_size())
                if tuple(w.shape) == tuple(p.shape[1:]) and w.stride() == p.stride()[1:]:
                    return name, int(e), False
                return name, int(e), True
        return None

    def see(self, x: torch.Tensor, name: str, e: int, as_input_rows: bool) -> None:
        key = (x.data_ptr(), tuple(x.shape))
        self.alive.append(x)
        opened = self.first.setdefault(e, key)
        if opened != key or (self.only is not None and (name, e) not in self.only):
            return
        if not as_input_rows:
            self.transposed[name] = True
        self.transposed.setdefault(name, False)
        acc = self.acc.get((name, e))
        if acc is None:
            acc = self.acc[(name, e)] = HessianAccumulator(x.shape[-1], device=x.device, dtype=self.hdtype,
                                                            name=f"{name}[{e}]")
        acc.add(x)
        self.tokens[(name, e)] = self.tokens.get((name, e), 0) + x.reshape(-1, x.shape[-1]).shape[0]


class _Watch(TorchFunctionMode):
    """Feeds ``F.linear(x, W[e])`` and ``x @ W[e]`` on watched parameters to a `_Stage`; a watched parameter used
    by any other operation marks the stage unsupported."""

    LINEAR = {torch.nn.functional.linear}
    MATMUL = {torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__}
    VIEWS = {torch.Tensor.__getitem__, torch.Tensor.t, torch.Tensor.transpose, torch.Tensor.T.__get__,
             torch.Tensor.data.__get__, torch.Tensor.dtype.__get__, torch.Tensor.shape.__get__,
             torch.Tensor.device.__get__, torch.Tensor.dim, torch.Tensor.size}

    BATCHED = {torch.bmm, torch.Tensor.bmm}

    def __init__(self, stage: _Stage):
        super().__init__()
        self.stage = stage

    def _whole(self, w: Any) -> Optional[str]:
        """The name of the watched parameter ``w`` is (all experts at once, as in Llama 4's bmm), else None."""
        for name, p in self.stage.params.items():
            if isinstance(w, torch.Tensor) and w.dim() == 3 and w.data_ptr() == p.data_ptr() and w.shape == p.shape:
                return name
        return None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.LINEAR and len(args) >= 2:
            hit = self.stage.locate(args[1])
            if hit is not None:
                name, e, transposed = hit
                if transposed:
                    self.stage.unsupported = f"{name}: F.linear on a transposed expert slice"
                self.stage.see(args[0], name, e, as_input_rows=True)
        elif func in self.MATMUL and len(args) >= 2:
            hit = self.stage.locate(args[1])
            if hit is not None:
                name, e, _ = hit
                self.stage.see(args[0], name, e, as_input_rows=False)
        elif func in self.BATCHED and len(args) >= 2 and self._whole(args[1]) is not None:
            name = self._whole(args[1])
            for e in range(args[0].shape[0]):  # x [E, tokens, in] @ W [E, in, out]: rows of zeros are tokens not routed
                x = args[0][e]
                self.stage.first.pop(e, None)
                self.stage.see(x[x.ne(0).any(-1)], name, e, as_input_rows=False)
        elif func not in self.VIEWS and self.stage.unsupported is None:
            for a in list(args) + list(kwargs.values()):
                if isinstance(a, torch.Tensor) and a.dim() == 3 and any(a is p for p in self.stage.params.values()):
                    self.stage.unsupported = f"the experts call {getattr(func, '__name__', func)} on the whole tensor"
        return func(*args, **kwargs)


# ---------------------------------------------------------------------------------------------- running the experts
class _Eager:
    """The experts module runs transformers' ``eager`` implementation (its per-expert loop) inside the block."""

    def __init__(self, mod: nn.Module):
        self.cfg = getattr(mod, "config", None)
        self.old = None

    def __enter__(self):
        if self.cfg is not None and hasattr(self.cfg, "_experts_implementation_internal"):
            self.old = self.cfg._experts_implementation_internal
            self.cfg._experts_implementation_internal = "eager"
        return self

    def __exit__(self, *exc):
        if self.old is not None:
            self.cfg._experts_implementation_internal = self.old


@torch.no_grad()
def capture_calls(block: nn.Module, mod: nn.Module, chunks: Iterable) -> list[tuple[tuple, dict]]:
    """The experts module's call arguments, one per chunk of block inputs (the block's forward stops there)."""
    calls: list[tuple[tuple, dict]] = []

    def hook(_m, args, kwargs):
        calls.append((args, dict(kwargs)))
        raise _Stop

    handle = mod.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for hs, kw in chunks:
            try:
                block(hs, **kw)
            except _Stop:
                pass
    finally:
        handle.remove()
    return calls


def _all_experts(args: tuple, kwargs: dict, num_experts: int) -> Optional[tuple[tuple, dict]]:
    """The call with every token routed to every expert (weight 1), or None when the routing arguments (an integer
    [tokens, k] tensor followed by a float one of the same shape) cannot be found."""
    vals = list(args) + list(kwargs.values())
    keys = [None] * len(args) + list(kwargs)
    idx = next((i for i, v in enumerate(vals) if isinstance(v, torch.Tensor) and v.dim() == 2
                and not v.is_floating_point()), None)
    if idx is None:
        return None
    ti = vals[idx]
    wi = next((i for i, v in enumerate(vals) if isinstance(v, torch.Tensor) and v.is_floating_point()
               and tuple(v.shape) == tuple(ti.shape)), None)
    if wi is None:
        return None
    t = ti.shape[0]
    vals[idx] = torch.arange(num_experts, device=ti.device, dtype=ti.dtype).expand(t, num_experts).contiguous()
    vals[wi] = torch.ones(t, num_experts, device=vals[wi].device, dtype=vals[wi].dtype)
    new_args = tuple(vals[:len(args)])
    new_kwargs = {k: v for k, v in zip(keys[len(args):], vals[len(args):])}
    return new_args, new_kwargs


@torch.no_grad()
def run_stage(mod: nn.Module, calls, params: dict[str, nn.Parameter], hdtype: torch.dtype,
              only: Optional[set] = None, route_all: bool = False) -> _Stage:
    """One pass of the experts module over the captured calls, watching ``params``."""
    stage = _Stage(params=params, hdtype=hdtype, only=only)
    with _Eager(mod):
        for args, kwargs in calls:
            if route_all:
                swapped = _all_experts(args, kwargs, mod.num_experts)
                if swapped is None:
                    stage.unsupported = "the routing arguments (indices, weights) were not recognised"
                    return stage
                args, kwargs = swapped
            stage.first.clear()
            with _Watch(stage):
                mod(*args, **kwargs)
            stage.alive.clear()
    return stage


# ---------------------------------------------------------------------------------------------- the solve
@dataclass
class ExpertsContext:
    """What `compress_block_experts` needs of the driver's run."""
    solve: Callable[[str, Any, torch.Tensor], None]  # the driver's solve(name, module, H)
    selected: Callable[[str], bool]
    records: dict  # the driver's LayerRecords: expert records are moved from here ...
    expert_records: dict  # ... to here (converters see 2-D linear layers only)
    rows: list  # the driver's report rows
    log: list  # report["moe"]["experts"]
    params: dict  # report["moe"]["params"]
    hdtype: torch.dtype = torch.float32
    routers: list = field(default_factory=list)  # router layers left dense
    reduce: Optional[Callable[[torch.Tensor, int], tuple[torch.Tensor, int]]] = None  # across ranks


def compress_block_experts(block: nn.Module, prefix: str, chunks, ctx: ExpertsContext) -> bool:
    """Compress every fused experts module of ``block`` (``prefix``: its dotted path); False when it has none.
    ``chunks``: the block's inputs [(hidden_states, kwargs)], on the compute device."""
    mods = fused_experts(block)
    for mname, mod in mods.items():
        calls = capture_calls(block, mod, chunks)
        watched = {n: p for n, p in fused_params(mod).items()
                   if any(ctx.selected(f"{prefix}.{mname}.{n}.{e}") for e in range(p.shape[0]))}
        _compress_module(mod, f"{prefix}.{mname}", calls, watched, ctx)
    return bool(mods)


def _compress_module(mod: nn.Module, mprefix: str, calls, remaining: dict[str, nn.Parameter],
                     ctx: ExpertsContext) -> None:
    routed: dict[int, int] = {}
    while remaining:
        stage = run_stage(mod, calls, remaining, ctx.hdtype)
        members = sorted({n for n, _ in stage.acc}, key=list(remaining).index)
        if stage.unsupported or not members:
            why = stage.unsupported or "no expert matrix was reached by the experts' forward"
            for n in remaining:
                _left_dense(f"{mprefix}.{n}", remaining[n], why, ctx)
            return
        for e in range(mod.num_experts):  # tokens routed to each expert: the first stage's input rows
            routed.setdefault(e, max((stage.tokens.get((n, e), 0) for n in members), default=0))
        short = {(n, e) for n in members for e in range(mod.num_experts) if _count(stage, n, e, ctx) < MIN_TOKENS}
        fallback = run_stage(mod, calls, {n: remaining[n] for n in members}, ctx.hdtype, only=short,
                             route_all=True) if short else None
        for n in members:
            _solve_param(mprefix, n, remaining.pop(n), stage, fallback, routed, ctx)


def _count(stage: _Stage, n: str, e: int, ctx: ExpertsContext) -> int:
    acc = stage.acc.get((n, e))
    if ctx.reduce is None:
        return acc.nsamples if acc is not None else 0
    return ctx.reduce(torch.zeros(1, 1), acc.nsamples if acc is not None else 0)[1]


def _hessian(stage: _Stage, n: str, e: int, ctx: ExpertsContext, cols: int) -> Optional[torch.Tensor]:
    acc = stage.acc.get((n, e))
    if ctx.reduce is not None:
        H = acc.H if acc is not None else torch.zeros(cols, cols, dtype=ctx.hdtype)
        return ctx.reduce(H, acc.nsamples if acc is not None else 0)[0]
    return acc.H if acc is not None else None


def _solve_param(mprefix: str, n: str, p: nn.Parameter, stage: _Stage, fallback: Optional[_Stage],
                 routed: dict, ctx: ExpertsContext) -> None:
    transposed = stage.transposed.get(n, False)
    rows_, cols = (p.shape[2], p.shape[1]) if transposed else (p.shape[1], p.shape[2])
    ctx.params[f"{mprefix}.{n}"] = {"experts": p.shape[0], "transposed": transposed, "shape": [rows_, cols]}
    for e in range(p.shape[0]):
        name = f"{mprefix}.{n}.{e}"
        if not ctx.selected(name):
            continue
        view = p.data[e].t() if transposed else p.data[e]
        tokens = _count(stage, n, e, ctx)
        how, H = "routed", _hessian(stage, n, e, ctx, cols)
        if tokens < MIN_TOKENS:
            usable = fallback is not None and fallback.unsupported is None and (n, e) in fallback.acc
            how = "all tokens (fallback)" if usable else "left dense"
            H = _hessian(fallback, n, e, ctx, cols) if usable else None
        ctx.log.append({"layer": name, "expert": e, "tokens": routed.get(e, tokens), "hessian": how})
        if H is None:
            _left_dense(name, None, f"expert {e} got {tokens} calibration tokens and no fallback Hessian", ctx)
            continue
        before = len(ctx.rows)
        ctx.solve(name, ExpertMatrix(view), H)
        for row in ctx.rows[before:]:
            row.update(expert=e, tokens=tokens, hessian=how)
        if name in ctx.records:
            ctx.expert_records[name] = ctx.records.pop(name)


def _left_dense(name: str, p: Optional[nn.Parameter], why: str, ctx: ExpertsContext) -> None:
    msg = f"experts {name}: {why}; left dense"
    warnings.warn(msg)
    shape = list(p.shape) if p is not None else None
    ctx.rows.append({"layer": name, "pattern": "skipped", "warning": msg, "shape": shape})


def report(ctx: ExpertsContext) -> dict:
    return {"min_tokens": MIN_TOKENS, "fallback": FALLBACK, "params": ctx.params, "experts": ctx.log,
            "routers_left_dense": ctx.routers}


@torch.no_grad()
def block_outputs(block: nn.Module, chunks, to_cpu: bool = False) -> list[torch.Tensor]:
    """The block's hidden-state outputs on its (now compressed) weights, one per chunk."""
    outs = []
    for hs, kw in chunks:
        o = block(hs, **kw)
        o = o[0] if isinstance(o, (tuple, list)) else getattr(o, "hidden_states", o)
        outs.append(o.cpu() if to_cpu else o)
    return outs
