"""One block over its calibration windows, every layer compressed as soon as its calibration inputs are complete.

Each chunk of windows runs the block's forward, which stops at the pre-hook of every layer not yet solved. The
first chunk runs in the calling thread; every other chunk in a worker thread of its own. The chunks run one at a
time, in order, so nothing runs in parallel and the order of the arithmetic is fixed:

1. a chunk that stops at a layer reading a new input hands that input over; it is added to the layer's Hessian
   (chunk after chunk, in order);
2. once every chunk stands at that layer, the Hessian is complete (summed over the ranks under torchrun) and the
   layer is solved, with the layers that share its input (q/k/v, gate/up: ``shared_input_groups``);
3. the chunks go on, each layer now computing with its compressed weight; a later layer that reads the same input
   is solved with the same Hessian on the way.

With ``keep_paused`` (the default) a stopped chunk keeps its forward alive, so each chunk runs through the block
exactly once: one forward per block, whatever the number of chunks or ranks. Without it (activations over
``--max-memory``, ``--offload disk``) a stopped chunk's forward is abandoned after handing its input over and
re-run from the block's start in the next round, so that only one chunk's activations are alive at a time.

Why the first chunk runs in the calling thread, where the round's work is then done inside its layer's pre-hook
(``BlockRun._inline_stop``): glibc's malloc serves a thread other than the main one from an arena whose heaps hold
at most 64 MB, so every larger tensor of a forward in a worker thread is a fresh ``mmap``, paid in page faults
whatever ``hostmem.reuse_freed_memory`` says. On SmolLM2 (128 x 512 tokens in one chunk) a block's forward took
6.1 s in a worker thread against 3.6 s in the main thread, with 1.0 million page faults against 0.06 million
(``benchmarks/experiments/pipeline_speed_leads/forward_arena.py``). With one chunk, the default, no thread is
started at all.
"""
from __future__ import annotations

import functools
import queue
import threading
import time
from typing import Any, Optional

import torch
from torch import nn

from .. import distributed as distmod
from ..anatomy import first_hidden
from ..solver import HessianAccumulator, SolverError
from .layers import solve_group
from .state import RunState

_local = threading.local()  # the ChunkRun whose forward runs in this thread


class _Abort(BaseException):
    """Raised in a worker thread to abandon its forward."""


class ChunkRun:
    """One chunk's forward through the block, stopping where the driving code must see it: in a thread of its own
    (its stops are events for the main thread), or with ``inline`` in the caller's thread (the layer's pre-hook
    does the round's work itself)."""

    def __init__(self, block: nn.Module, hs: torch.Tensor, kw: dict, device: Optional[torch.device],
                 inline: bool = False):
        self.block, self.hs, self.kw, self.device = block, hs, kw, device
        self.inline = inline  # the forward runs in the caller's thread (its stops handled by BlockRun._inline_stop)
        self.cmd: queue.Queue = queue.Queue(maxsize=1)
        self.evt: queue.Queue = queue.Queue(maxsize=1)
        self.thread: Optional[threading.Thread] = None
        self.out: Optional[torch.Tensor] = None
        self.keys: dict[str, tuple] = {}  # this forward: layer -> the key of the input it stopped with
        self.passed: set[str] = set()  # this forward: solved layers already called once (Zaya calls one twice)
        self.input_key: Optional[tuple] = None  # the input of the last layer this forward stopped at
        self.input: Optional[torch.Tensor] = None  # ... held, so that no later tensor takes its address

    @property
    def finished(self) -> bool:
        return self.out is not None

    def _forward(self) -> torch.Tensor:
        hs = self.hs if self.device is None else self.hs.to(self.device)
        with torch.no_grad():
            return first_hidden(self.block(hs, **self.kw))

    def _run(self) -> None:
        _local.run = self
        try:
            self.evt.put(("done", self._forward()))
        except _Abort:
            self.evt.put(("aborted", None))
        except BaseException as e:  # handed to the main thread, which raises it
            self.evt.put(("error", e))

    def _fresh(self) -> None:
        self.keys, self.passed, self.input_key, self.input = {}, set(), None, None

    def _advance_inline(self) -> tuple:
        """The whole forward in the calling thread: ("done", output), or ("aborted", None) when a stop abandoned
        it."""
        self._fresh()
        outer, _local.run = getattr(_local, "run", None), self
        try:
            out = self._forward()
        except _Abort:
            return ("aborted", None)
        finally:
            _local.run = outer
        self.out, self.input = out, None
        return ("done", out)

    def stop(self, lname: str, x: torch.Tensor, shared: bool) -> None:
        """In the worker thread: hand the layer's input over and wait for the main thread's word (``_Abort``:
        abandon the forward)."""
        self.evt.put(("layer", lname, x, shared))
        if self.cmd.get() == "abort":
            raise _Abort

    def advance(self) -> tuple:
        """Start or continue the forward; the next event: ("layer", name, input, shared), ("done", output),
        ("aborted", None) (inline only)."""
        if self.inline:
            return self._advance_inline()
        if self.thread is None:
            self._fresh()
            self.thread = threading.Thread(target=self._run, daemon=True, name="sparsegpt-chunk")
            self.thread.start()
        else:
            self.cmd.put("go")
        ev = self.evt.get()
        if ev[0] == "error":
            self.thread = None
            raise ev[1]
        if ev[0] == "done":
            self.thread, self.out, self.input = None, ev[1], None
        return ev

    def abandon(self) -> None:
        """End a stopped forward (its thread raises and exits)."""
        if self.thread is not None:
            self.cmd.put("abort")
            self.evt.get()
            self.thread.join()
            self.thread = None


class BlockRun:
    """Drives the chunks of one block (see the module's docstring). ``run()`` returns the block's outputs."""

    def __init__(self, state: RunState, block: nn.Module, todo: dict[str, nn.Module], groups: list[list[str]],
                 chunks, keep_paused: bool = True, device: Optional[torch.device] = None):
        self.state, self.block, self.todo, self.keep_paused = state, block, todo, keep_paused
        self.group_of = {n: g for g in groups for n in g}
        self.runs = [ChunkRun(block, hs, kw, device, inline=i == 0) for i, (hs, kw) in enumerate(chunks)]
        self.solved: set[str] = set()
        self.acc: Optional[HessianAccumulator] = None
        self.H: Optional[torch.Tensor] = None  # the complete Hessian of the last input, for layers sharing it
        self.round_layer: Optional[str] = None
        self.busy_s = 0.0  # time spent on Hessians and solves (the rest of the block's time is its forward)

    def run(self) -> list[torch.Tensor]:
        handles = [mod.register_forward_pre_hook(functools.partial(self._pre_hook, name))
                   for name, mod in self.todo.items()]
        try:
            while True:
                self.round_layer, self.acc = None, None
                for run in self.runs:
                    self._drive(run)
                if self.round_layer is None:
                    break
                self._solve(self.round_layer, self._complete())
        finally:
            for h in handles:
                h.remove()
            for run in self.runs:
                run.abandon()
        # layers never called are left dense; families.note_unreached gives each a report row and warning
        return [run.out for run in self.runs]

    def _pre_hook(self, lname: str, _mod: nn.Module, args: tuple) -> None:
        """In a worker thread, before a layer computes: stop there unless the layer is solved."""
        run = getattr(_local, "run", None)
        if run is None:
            return
        x = args[0]
        key = (x.data_ptr(), tuple(x.shape))
        if lname in self.solved:
            first = self.group_of.get(lname, [lname])[0]
            if lname in run.passed:  # a second call in one forward (on another input) is not the shared one
                return
            run.passed.add(lname)
            if first != lname and first in run.keys and run.keys[first] != key:
                raise SolverError(
                    f"layer {lname}: it was solved with {first}, whose input it shared in the first window, but here "
                    "its input differs; rerun with --no-stack-shared-inputs")
            return
        shared = key == run.input_key
        run.keys[lname], run.input_key, run.input = key, key, x
        if run.inline:  # no reference from the run back to this object: its chunks' tensors go with it
            self._inline_stop(run, lname, x, shared)
        else:
            run.stop(lname, x, shared)

    def _drive(self, run: ChunkRun) -> None:
        """Run one chunk until it stops at a layer reading a new input (whose input is then added to the round's
        Hessian), or finishes. Layers that share an input whose Hessian is complete are solved on the way."""
        while not run.finished:
            ev = run.advance()
            if ev[0] != "layer":  # done, or (inline) abandoned after its input joined the round
                return
            if self._on_layer(run, *ev[1:]):
                continue
            if not self.keep_paused:
                run.abandon()
            return

    def _on_layer(self, run: ChunkRun, lname: str, x: torch.Tensor, shared: bool) -> bool:
        """A chunk stopped before ``lname``: True when the layer shares the last solved input and was solved on the
        way (the chunk goes on); False when its input joined the round's Hessian."""
        if shared and self.H is not None:
            self._solve(lname, self.H)
            return True
        if self.round_layer is None:
            self.round_layer = lname
        elif lname != self.round_layer:
            raise SolverError(f"layer {lname}: a chunk of calibration windows reached it where the others reached "
                              f"{self.round_layer}; the block's forward must call its layers in the same order")
        self._accumulate(lname, x, run.hs.shape[0])
        return False

    def _inline_stop(self, run: ChunkRun, lname: str, x: torch.Tensor, shared: bool) -> None:
        """The first chunk's stop, in the calling thread. With ``keep_paused`` the round is done here: the other
        chunks are driven to the same layer, the layer is solved, and the forward goes on; without it the forward
        is abandoned (``_Abort``) and the round goes on in ``run``."""
        if self._on_layer(run, lname, x, shared):
            return
        if not self.keep_paused:
            raise _Abort
        for other in self.runs[1:]:
            self._drive(other)
        self._solve(self.round_layer, self._complete())
        self.round_layer, self.acc = None, None

    def _accumulate(self, lname: str, x: torch.Tensor, windows: int) -> None:
        t = time.perf_counter()
        if self.acc is None:
            self.acc = HessianAccumulator(x.shape[-1], device=x.device, dtype=self.state.hdtype, name=lname,
                                          group=self.state.hessian_group)
        self.acc.add(x, windows)
        dt = time.perf_counter() - t
        self.state.time("hessian_s", dt)
        self.busy_s += dt

    def _complete(self) -> torch.Tensor:
        """The round's Hessian over every chunk (and every rank)."""
        t = time.perf_counter()
        self.H = complete_hessian(self.state, self.acc)
        self.busy_s += time.perf_counter() - t
        return self.H

    def _solve(self, lname: str, H: torch.Tensor) -> None:
        t = time.perf_counter()
        members = [n for n in self.group_of.get(lname, [lname]) if n not in self.solved and n in self.todo]
        self.state.postfix(",".join(n.rsplit(".", 2)[-2] + "." + n.rsplit(".", 1)[-1] for n in members))
        solve_group(self.state, [(n, self.todo[n]) for n in members], H)
        self.solved.update(members)
        self.busy_s += time.perf_counter() - t


def complete_hessian(state: RunState, acc: HessianAccumulator) -> torch.Tensor:
    """The Hessian of ``acc``, its float64 sum added over the ranks first under torchrun."""
    t = time.perf_counter()
    if state.dist is None:
        H = acc.H
    else:
        total, n = distmod.all_reduce_hessian(state.dist, *acc.total())
        H = acc.normalized(total, n)
    state.time("hessian_s", time.perf_counter() - t)
    return H


def run_block(state: RunState, block: nn.Module, todo: dict[str, nn.Module], groups: list[list[str]], chunks,
              keep_paused: bool = True, device: Optional[torch.device] = None) -> list[torch.Tensor]:
    """Compress the ``todo`` layers of ``block`` on ``chunks`` [(hidden_states, kwargs), ...]; the block's outputs
    on the compressed weights, one per chunk."""
    t = time.perf_counter()
    br = BlockRun(state, block, todo, groups, chunks, keep_paused, device)
    outs = br.run()
    state.time("block_forward_s", time.perf_counter() - t - br.busy_s)
    return outs


def forward_only(block: nn.Module, chunks, device: Optional[torch.device] = None) -> list[Any]:
    """The block's outputs on its current weights (a finished block, when resuming)."""
    with torch.no_grad():
        return [first_hidden(block(hs if device is None else hs.to(device), **kw)) for hs, kw in chunks]
