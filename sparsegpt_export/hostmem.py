"""How glibc's malloc hands host memory to the tensors of a compression run (a no-op off glibc).

Two opposite needs:
- in memory (``--offload cpu``/``none`` on the CPU), a block's forward allocates and frees activations of hundreds
  of MB again and again. glibc serves every allocation above 32 MB from a fresh ``mmap``, so each one is paid
  again in page faults and zeroed pages (on SmolLM2 with 128 x 512 calibration tokens, 33 million faults and
  two fifths of the run in the kernel). ``reuse_freed_memory`` keeps freed memory in the process for the run:
  the same pages serve the next block, and the process holds its peak working set until the run ends;
- ``--offload disk`` must keep the resident memory small: ``returns_memory`` pins the mmap threshold low so that
  a dropped block goes back to the system, and ``trim`` gives back what the heap holds. It is called before the
  model skeleton, the tokenizer and the calibration data are built: on a 10-block model of the scale benchmark's
  shapes the peak RSS was 877 MB with the pin at the start against 1188 MB with it set when the first block was
  fetched (the heap grew block after block), and 1152 MB with an 8 MB threshold from the start; the 1 MB pin costs
  about 29% more compress time on the CPU (page faults of fresh mmaps), the price of the smaller peak
  (``benchmarks/results/memory_profile_disk_10blocks_*.log``).
"""
from __future__ import annotations

import contextlib
from typing import Iterator

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -3, -4, -8
_GLIBC_MMAP_MAX_DEFAULT, _GLIBC_TRIM_DEFAULT = 65536, 128 * 1024


def _libc():
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:  # pragma: no cover
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def returns_memory() -> None:
    """Pin the mmap threshold at 1 MB: tensors come from mmap and go back to the system when freed."""
    libc = _libc()
    if libc is not None:
        libc.mallopt(M_MMAP_THRESHOLD, 1 << 20)


def trim() -> None:
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


@contextlib.contextmanager
def reuse_freed_memory(enabled: bool = True) -> Iterator[bool]:
    """For the duration: large allocations come from the heap (no mmap) and freed memory is not trimmed, so that
    it is reused without page faults; one heap (arena) for every thread, so that what one chunk's forward thread
    frees serves the next (`pipeline.blockrun` runs each chunk in a thread of its own; with an arena per thread,
    10 chunks of SmolLM2 peaked at 5.7 GB against 3.3 GB in one forward); afterwards glibc's defaults are back and
    the heap is trimmed. Yields whether the setting took effect."""
    libc = _libc() if enabled else None
    if libc is None:
        yield False
        return
    ok = bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, -1))  # -1: never trim
    libc.mallopt(M_ARENA_MAX, 1)
    try:
        yield ok
    finally:
        libc.mallopt(M_ARENA_MAX, 0)  # 0: glibc's default (by the number of cores)
        libc.mallopt(M_MMAP_MAX, _GLIBC_MMAP_MAX_DEFAULT)
        libc.mallopt(M_TRIM_THRESHOLD, _GLIBC_TRIM_DEFAULT)
        libc.malloc_trim(0)
