"""Issue #25: the sweep's column steps (`sparsegpt_export.solver.columns`) as TorchScript against the same function in
Python, one lazy block of 128 columns (2:4, unquantized) of 576 rows, 20 repeats, torch on one thread: the time of
one block, and of two blocks run at once on two threads (TorchScript releases the interpreter lock; Python does not).

    python -m benchmarks.experiments.column_steps
"""
from __future__ import annotations

import threading
import time

import torch

from sparsegpt_export.solver import columns as C

ROWS, COUNT, REPEATS = 576, 128, 20


def block_args():
    g = torch.Generator().manual_seed(0)
    Wt = torch.randn(COUNT, ROWS, generator=g)
    U = torch.linalg.cholesky(torch.eye(COUNT) * 2 + 0.01, upper=True)
    d = torch.diag(U)
    return (Wt, torch.zeros(COUNT, ROWS, dtype=torch.bool), torch.empty_like(Wt), None, torch.empty_like(Wt), U,
            d.tolist(), d.reshape(-1, 1) ** 2, 0, COUNT, None, None, None, 2, 4)


def repeat(fn, args) -> None:
    for _ in range(REPEATS):
        fn(*args)


def timed(fn) -> tuple[float, float]:
    """Seconds per block alone, and per block with two threads each running its own block."""
    for _ in range(3):
        fn(*block_args())
    t = time.perf_counter()
    repeat(fn, block_args())
    alone = (time.perf_counter() - t) / REPEATS
    threads = [threading.Thread(target=repeat, args=(fn, block_args())) for _ in range(2)]
    t = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return alone, (time.perf_counter() - t) / REPEATS


def main() -> None:
    torch.set_num_threads(1)
    scripted = C.scripted()
    print(f"torch {torch.__version__}; {ROWS} rows, a block of {COUNT} columns (2:4), {REPEATS} repeats; TorchScript "
          f"{'available' if scripted is not None else 'missing'}")
    for name, fn in [("python", C.columns), ("torchscript", scripted)]:
        if fn is None:
            continue
        alone, two = timed(fn)
        print(f"{name}: one block {alone * 1e3:.2f} ms ({alone / COUNT * 1e6:.1f} us a column); two threads, a block "
              f"each: {two * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
