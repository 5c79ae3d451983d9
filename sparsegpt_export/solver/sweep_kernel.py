"""One lazy block of the column sweep (`solver.obs`) as a single Triton kernel: no launch per column on the GPU.

On a GPU the sweep's per-column steps (`solver.columns`) are a dozen small kernel launches per column, so a block of
128 columns costs about 1500 launches and the GPU waits on the host. Here one launch does a whole block: each program
holds a tile of ``BR`` rows by the block's columns in registers and walks the columns in order, doing what
`solver.columns` does per column, for its rows only (every step is per row, so tiles of rows are independent):

1. at the first column of each group of M (``CHOOSE``): the N:M mask of the group, the M - N weights of least
   saliency dropped. The saliency is ``w^2 / U_jj^2``, or with a grid ``(w^2 - (w - q(w))^2) / U_jj^2`` (what
   keeping a weight would cost anyway is its quantization error), as `obs._Sweep.choose_nm`; ties go to the lower
   column;
2. the column's kept value ``q`` (on the row's grid ``scale, lo, hi`` with ``QUANT``, else ``w``; 0 where pruned)
   and its error ``e = (w - q) / U_jj``;
3. ``W[:, j+1:] -= e U[j, j+1:]`` on the tile (one product and one difference: fp fusion is off at launch).

The kept values are written over the block of ``W``, the errors into ``E`` (for the lazy update of the columns
after the block, a matrix product left to the caller) and the mask into ``mask``. Rounding half to even is done
with the 1.5 * 2^23 trick on the value clamped to ``[lo - 1, hi + 1]`` (the same integer after the clamp to
``[lo, hi]`` as ``torch.round``); division is IEEE (``div_rn``). Under ``TRITON_INTERPRET=1`` it runs on CPU tensors
with numpy, which is how the CPU tests compare it with the torch sweep.

The grid is fixed inside a block (the caller fits it at the block's first column: a group's first column is a
block's first column when the block is no wider than the group), and an unstructured or fixed mask comes in
``mask``. Imported only when the kernel runs (needs ``triton``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_ROWS = 16  # rows per program: the tiles W, E, Q of [16 x 128] float32 stay in registers
NUM_WARPS = 8  # with 4 warps ptxas spills (sm90: 228-255 registers a thread); with 8, 127-235 and at most 16 bytes
ROUND_MAGIC = tl.constexpr(12582912.0)  # 1.5 * 2^23: x + it - it rounds |x| < 2^22 to the nearest integer, ties to even


@triton.jit
def _column(T, c, j):
    """Column ``j`` of the tile ``T`` [BR, BB], as [BR]."""
    return tl.sum(tl.where(c[None, :] == j, T, 0.0), axis=1)


@triton.jit
def _on_grid(w, scale, lo, hi):
    """``clamp(round(w / scale), lo, hi) * scale``, rounding half to even."""
    x = tl.math.div_rn(w, scale)
    x = tl.minimum(tl.maximum(x, lo - 1.0), hi + 1.0)
    x = (x + ROUND_MAGIC) - ROUND_MAGIC
    return tl.minimum(tl.maximum(x, lo), hi) * scale


@triton.jit
def _choose(W, MK, c, j, u_ptr, su0, su1, scale, lo, hi, N: tl.constexpr, M: tl.constexpr, QUANT: tl.constexpr,
            BR: tl.constexpr):
    """The mask tile ``MK`` with the N:M choice of columns ``j .. j+M-1`` added."""
    k_idx = tl.arange(0, M)
    S = tl.zeros([BR, M], dtype=tl.float32)
    for k in tl.static_range(M):
        w = _column(W, c, j + k)
        d = tl.load(u_ptr + (j + k) * (su0 + su1))
        gain = w * w
        if QUANT:
            r = w - _on_grid(w, scale, lo, hi)
            gain = gain - r * r
        S = tl.where(k_idx[None, :] == k, (gain / (d * d))[:, None], S)
    for k in tl.static_range(M):
        s_k = tl.sum(tl.where(k_idx[None, :] == k, S, 0.0), axis=1)
        below = (S < s_k[:, None]) | ((S == s_k[:, None]) & (k_idx[None, :] < k))
        pruned = tl.sum(below.to(tl.int32), axis=1) < (M - N)
        MK = MK | ((c[None, :] == j + k) & pruned[:, None])
    return MK


@triton.jit
def _sweep_block_kernel(w_ptr, stride_w, u_ptr, su0, su1, mask_ptr, stride_m, e_ptr, stride_e, s_ptr, lo_ptr, hi_ptr,
                        rows, count, N: tl.constexpr, M: tl.constexpr, CHOOSE: tl.constexpr, QUANT: tl.constexpr,
                        BR: tl.constexpr, BB: tl.constexpr):
    r = tl.program_id(0) * BR + tl.arange(0, BR)
    c = tl.arange(0, BB)
    inside = (r < rows)[:, None] & (c < count)[None, :]
    W = tl.load(w_ptr + r[:, None] * stride_w + c[None, :], mask=inside, other=0.0)
    MK = tl.load(mask_ptr + r[:, None] * stride_m + c[None, :], mask=inside, other=0) != 0
    Q = tl.zeros([BR, BB], dtype=tl.float32)
    E = tl.zeros([BR, BB], dtype=tl.float32)
    scale = tl.zeros([BR], dtype=tl.float32)
    lo = tl.zeros([BR], dtype=tl.float32)
    hi = tl.zeros([BR], dtype=tl.float32)
    if QUANT:
        scale = tl.load(s_ptr + r, mask=r < rows, other=1.0)
        lo = tl.load(lo_ptr + r, mask=r < rows, other=0.0)
        hi = tl.load(hi_ptr + r, mask=r < rows, other=0.0)
    for j in range(0, count):
        if CHOOSE:
            if j % M == 0:
                MK = _choose(W, MK, c, j, u_ptr, su0, su1, scale, lo, hi, N, M, QUANT, BR)
        w = _column(W, c, j)
        pruned = tl.sum(tl.where(c[None, :] == j, MK.to(tl.int32), 0), axis=1) != 0
        q = w
        if QUANT:
            q = _on_grid(w, scale, lo, hi)
        q = tl.where(pruned, 0.0, q)
        e = tl.math.div_rn(w - q, tl.load(u_ptr + j * (su0 + su1)))
        here = c[None, :] == j
        Q = tl.where(here, q[:, None], Q)
        E = tl.where(here, e[:, None], E)
        u = tl.load(u_ptr + j * su0 + c * su1, mask=(c > j) & (c < count), other=0.0)
        W = tl.where(c[None, :] > j, W - e[:, None] * u[None, :], W)
    tl.store(w_ptr + r[:, None] * stride_w + c[None, :], Q, mask=inside)
    tl.store(e_ptr + r[:, None] * stride_e + c[None, :], E, mask=inside)
    tl.store(mask_ptr + r[:, None] * stride_m + c[None, :], MK.to(tl.uint8), mask=inside)


def sweep_block(W: torch.Tensor, U1: torch.Tensor, mask: torch.Tensor, grid, n: int, m: int, choose: bool) -> torch.Tensor:
    """One lazy block on the device, in place: ``W`` [rows, count] (float32, unit column stride; a view of the
    weight) gets the kept values; ``mask`` [rows, count] (uint8, contiguous; in: the fixed or unstructured mask, out:
    with the N:M choice when ``choose``) the mask; ``U1`` [count, count] is the block of the inverse Cholesky factor;
    ``grid`` ``(scale, lo, hi)`` [rows] or None. Returns the errors ``E`` [rows, count]."""
    rows, count = W.shape
    E = torch.empty(rows, count, dtype=torch.float32, device=W.device)
    scale, lo, hi = grid if grid is not None else (E, E, E)
    bb = max(16, triton.next_power_of_2(count))
    br = BLOCK_ROWS if W.device.type != "cpu" else 64  # the interpreter: fewer, larger programs (numpy per step)
    _sweep_block_kernel[(triton.cdiv(rows, br),)](
        W, W.stride(0), U1, U1.stride(0), U1.stride(1), mask, mask.stride(0), E, E.stride(0), scale, lo, hi, rows, count,
        N=n if choose else 0, M=m if choose else 1, CHOOSE=choose, QUANT=grid is not None, BR=br, BB=bb,
        **({} if W.device.type == "cpu" else {"enable_fp_fusion": False, "num_warps": NUM_WARPS}))
    return E
