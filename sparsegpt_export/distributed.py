"""Many processes, one compression: the calibration windows split across torch.distributed ranks.

Launched with ``torchrun --nproc-per-node N -m sparsegpt_export compress ...`` (or ``accelerate launch``), every
rank loads the model and the same calibration windows, keeps its contiguous share of them, and runs each block on
that share. The Hessians are sums over tokens, so they are all-reduced (``n * H`` in float64 and the token counts)
and normalised; the layers of a group that share an input (q/k/v, gate/up) are solved on different ranks at the
same time and their results broadcast, so every rank continues the block on identical compressed weights. Where
the layers do not share out evenly (one o_proj or down_proj) and the problem is row by row (N:M with the OBS
sweep), every rank solves its share of each layer's rows instead. Rank 0
writes the output. NCCL on GPUs, gloo on CPU.

Nothing here imports transformers; the driver calls :func:`current` and, when it returns a :class:`Dist`, these
collectives.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any, Optional

import torch


class DistributedError(RuntimeError):
    """A rank disagrees with the others, or a collective failed because another rank died."""


@dataclass
class Dist:
    rank: int
    world: int
    device: torch.device  # where the collectives' tensors must live (cuda for NCCL, cpu for gloo)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched() -> bool:
    """True when this process was started by torchrun / accelerate with more than one rank."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device: Optional[str] = None, timeout_s: float = 1800.0) -> Optional[Dist]:
    """Join the process group described by the launcher's environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``,
    ...); NCCL when the compute device is CUDA, gloo otherwise. Returns None for a single process."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return current()
    if not launched():
        return None
    if not dist.is_available():  # pragma: no cover
        raise DistributedError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed")
    use_cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    return current()


def current() -> Optional[Dist]:
    """The process group this process belongs to, when there is one with more than one rank."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return None
    cuda = dist.get_backend() == "nccl"
    dev = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    return Dist(rank=dist.get_rank(), world=dist.get_world_size(), device=dev)


def shutdown() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _call(what: str, fn, *args, **kwargs):
    """Run one collective; a peer that died turns gloo's / NCCL's error into one that says what to do."""
    try:
        return fn(*args, **kwargs)
    except (RuntimeError, ConnectionError) as e:  # DistBackendError is a RuntimeError
        if isinstance(e, DistributedError):
            raise
        rank = current().rank if current() else "?"
        raise DistributedError(
            f"rank {rank}: {what} failed ({str(e).splitlines()[0][:200]}); another rank has probably died or run out "
            "of memory (see its log). The last finished block is kept: rerun the same command with --resume"
        ) from None


def shard(calib: torch.Tensor, d: Optional[Dist], group: int = 1) -> torch.Tensor:
    """This rank's contiguous share of the calibration windows: whole groups of ``group`` windows (the Hessian's
    groups, so that each share starts at one: see ``solver.hessian``), the shares differing by at most one group.
    With fewer groups than ranks the windows are split one by one."""
    if d is None:
        return calib
    n = calib.shape[0]
    if n < d.world:
        raise DistributedError(f"nsamples={n} calibration windows cannot be split across {d.world} ranks; "
                               f"use at least {d.world} windows or fewer ranks")
    ng = -(-n // group)
    if ng < d.world:
        group, ng = 1, n
    lo, hi = (d.rank * ng) // d.world * group, min(((d.rank + 1) * ng) // d.world * group, n)
    return calib[lo:hi]


def check_same(d: Dist, **parts: str) -> None:
    """Every rank must run the same job: compare a hash of each named part (``arguments=...``, ``calibration=...``)
    and fail on every rank, naming the part and the ranks that differ."""
    import torch.distributed as dist

    digests = {k: hashlib.sha256(v.encode()).digest()[:8] for k, v in parts.items()}
    mine = torch.tensor([list(h) for h in digests.values()], dtype=torch.uint8, device=d.device)
    gathered = [torch.empty_like(mine) for _ in range(d.world)]
    _call("the start-up check", dist.all_gather, gathered, mine)
    for i, name in enumerate(digests):
        differ = [r for r in range(d.world) if not torch.equal(gathered[r][i], gathered[0][i])]
        if differ:
            raise DistributedError(
                f"ranks {differ} differ from rank 0 in their {name}; every rank must get the same command line, "
                "model and calibration data")


def all_reduce_hessian(d: Dist, total: torch.Tensor, n: int) -> tuple[torch.Tensor, int]:
    """The float64 sum of ``X^T X`` and the token count over all ranks, from each rank's own."""
    import torch.distributed as dist

    count = torch.tensor([float(n)], dtype=torch.float64, device=d.device)
    _call("all-reduce of the token count", dist.all_reduce, count)
    s = total.to(d.device, torch.float64).clone()
    _call("all-reduce of a Hessian", dist.all_reduce, s)
    return s.to(total.device), int(count.item())


def all_gather_json(d: Dist, obj: Any) -> list:
    """Every rank's JSON-able ``obj``, in rank order, on every rank."""
    return [broadcast_json(d, obj if r == d.rank else None, r) for r in range(d.world)]


def row_range(rows: int, d: Dist) -> tuple[int, int]:
    """This rank's contiguous share of ``rows`` (as ``shard`` splits the windows)."""
    return (d.rank * rows) // d.world, ((d.rank + 1) * rows) // d.world


def all_reduce_sum(d: Dist, t: torch.Tensor) -> torch.Tensor:
    """The sum of ``t`` over the ranks."""
    import torch.distributed as dist

    buf = t.detach().to(d.device).clone()
    _call("an all-reduce of layer errors", dist.all_reduce, buf)
    return buf.to(t.device)


def broadcast_tensor(d: Dist, t: torch.Tensor, src: int) -> torch.Tensor:
    """``t`` from rank ``src`` on every rank (same shape and dtype everywhere)."""
    import torch.distributed as dist

    buf = t.detach().to(d.device).contiguous()
    _call("a broadcast of solved weights", dist.broadcast, buf, src)
    return buf.to(t.device)


def broadcast_json(d: Dist, obj: Any, src: int) -> Any:
    """A JSON-able object from rank ``src`` (sent as UTF-8 bytes: nothing is unpickled)."""
    import torch.distributed as dist

    data = json.dumps(obj).encode() if d.rank == src else b""
    size = torch.tensor([len(data)], dtype=torch.int64, device=d.device)
    _call("a broadcast of layer records", dist.broadcast, size, src)
    buf = torch.zeros(int(size.item()), dtype=torch.uint8, device=d.device)
    if d.rank == src:
        buf.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    _call("a broadcast of layer records", dist.broadcast, buf, src)
    return json.loads(bytes(buf.cpu().tolist()).decode())


def barrier(d: Optional[Dist], what: str = "a barrier") -> None:
    if d is None:
        return
    import torch.distributed as dist

    _call(what, dist.barrier)


def owners(names: list[str], sizes: list[int], world: int) -> list[int]:
    """Which rank solves each layer of a group: largest first onto the least loaded rank (the solve costs about
    rows * cols^2, so sizes are those products); deterministic, the same on every rank."""
    load = [0] * world
    out = [0] * len(names)
    for i in sorted(range(len(names)), key=lambda i: (-sizes[i], names[i])):
        r = min(range(world), key=lambda r: (load[r], r))
        out[i] = r
        load[r] += sizes[i]
    return out
