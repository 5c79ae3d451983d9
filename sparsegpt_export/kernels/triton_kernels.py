"""Triton kernels for 2:4 weight-only linears (imported only when a kernel path runs; needs ``triton``).

``y[m, n] = sum_k x[m, k] * W[n, k]`` with ``W`` in the runtime layout of `layout` (int4 codes with scales, or
fp16/bf16 values, and 2-bit positions), rebuilt in registers and rounded to the input dtype, accumulated in
float32:

- `_gemv_kernel` (decode, small M): works in the group domain. A program takes ``BLOCK_N`` rows and a slice of
  the input groups (split-K), reads each group's byte of codes and its nibble of positions once, gathers the two
  matching inputs of ``x`` and adds its partial sums into a float32 output with atomics (split-K > 1), or stores
  its result directly (one slice: a single kernel); grid (N blocks, split-K, M). When a tile of ``4 * BLOCK_G`` inputs lies inside one quantization group (``TILE_SCALE``: the group size a
  multiple of it, e.g. 128 with ``BLOCK_G = 32``), the scale and zero are read once per row and applied to the
  tile's code sums (the weights are then not rounded to the input dtype first: a float32 difference).
- `_mm_kernel` (tiled, larger M): rebuilds a dense ``[BLOCK_N, BLOCK_K]`` tile of ``W`` per step and multiplies
  with ``tl.dot`` on the tensor cores.
- `_decode_kernel`: writes the dense weight (for large M, where cuBLAS on the decoded weight wins).

With ``TRITON_INTERPRET=1`` set before triton is first imported, triton runs them on CPU tensors with numpy
(no bfloat16 there): that is how the CPU tests check them.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl


@triton.jit
def _gemv_kernel(x_ptr, d_ptr, p_ptr, s_ptr, z_ptr, out_ptr, N, G, GS, G_PER_SPLIT, stride_xm, stride_d, stride_p,
                 stride_s, QUANT: tl.constexpr, SYM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr,
                 TILE_SCALE: tl.constexpr, ATOMIC: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    m = tl.program_id(2)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = rn < N
    g_begin = pid_k * G_PER_SPLIT
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for g0 in range(0, G_PER_SPLIT, BLOCK_G):
        rg = g_begin + g0 + tl.arange(0, BLOCK_G)
        mask = nmask[:, None] & ((rg < G) & (g0 + tl.arange(0, BLOCK_G) < G_PER_SPLIT))[None, :]
        pb = tl.load(p_ptr + rn[:, None] * stride_p + (rg // 2)[None, :], mask=mask, other=0).to(tl.int32)
        nib = (pb >> ((rg % 2) * 4)[None, :]) & 15
        p0 = nib & 3
        p1 = nib >> 2
        xrow = x_ptr + m * stride_xm + (4 * rg)[None, :]
        x0 = tl.load(xrow + p0, mask=mask, other=0).to(tl.float32)
        x1 = tl.load(xrow + p1, mask=mask, other=0).to(tl.float32)
        if QUANT:
            cb = tl.load(d_ptr + rn[:, None] * stride_d + rg[None, :], mask=mask, other=0).to(tl.int32)
            if TILE_SCALE:  # the tile lies in one quantization group: one scale (and zero) per row, applied once
                # a tile past the last group (its inputs all masked to 0) reads the last group's scale, not past it
                soff1 = rn * stride_s + tl.minimum(g_begin + g0, G - 1) * 4 // GS
                s1 = tl.load(s_ptr + soff1, mask=nmask, other=0).to(tl.float32)
                if SYM:
                    z1 = tl.full([BLOCK_N], 8.0, tl.float32)
                else:
                    z1 = tl.load(z_ptr + soff1, mask=nmask, other=0).to(tl.float32)
                c = (cb & 15).to(tl.float32) * x0 + (cb >> 4).to(tl.float32) * x1
                acc += s1 * (tl.sum(c, axis=1) - z1 * tl.sum(x0 + x1, axis=1))
            else:
                soff = rn[:, None] * stride_s + ((rg * 4) // GS)[None, :]
                s = tl.load(s_ptr + soff, mask=mask, other=0).to(tl.float32)
                if SYM:
                    z = 8.0
                else:
                    z = tl.load(z_ptr + soff, mask=mask, other=0).to(tl.float32)
                v0 = (((cb & 15).to(tl.float32) - z) * s).to(x_ptr.dtype.element_ty).to(tl.float32)
                v1 = (((cb >> 4).to(tl.float32) - z) * s).to(x_ptr.dtype.element_ty).to(tl.float32)
                acc += tl.sum(v0 * x0 + v1 * x1, axis=1)
        else:
            v0 = tl.load(d_ptr + rn[:, None] * stride_d + (2 * rg)[None, :], mask=mask, other=0).to(tl.float32)
            v1 = tl.load(d_ptr + rn[:, None] * stride_d + (2 * rg + 1)[None, :], mask=mask, other=0).to(tl.float32)
            acc += tl.sum(v0 * x0 + v1 * x1, axis=1)
    if ATOMIC:  # split-K: float32 partial sums into a zeroed output
        tl.atomic_add(out_ptr + m * N + rn, acc, mask=nmask)
    else:  # one slice: the result, in the output's dtype
        tl.store(out_ptr + m * N + rn, acc.to(out_ptr.dtype.element_ty), mask=nmask)


@triton.jit
def _weight_tile(d_ptr, p_ptr, s_ptr, z_ptr, rn, rk, nmask, kmask, GS, stride_d, stride_p, stride_s,
                 QUANT: tl.constexpr, SYM: tl.constexpr):
    """The dense [BLOCK_N, BLOCK_K] tile of W (float32), zeros outside the masks."""
    mask = nmask[:, None] & kmask[None, :]
    g = rk // 4
    pb = tl.load(p_ptr + rn[:, None] * stride_p + (g // 2)[None, :], mask=mask, other=0).to(tl.int32)
    nib = (pb >> ((g % 2) * 4)[None, :]) & 15
    slot = (rk % 4)[None, :]
    is0 = (nib & 3) == slot
    is1 = (nib >> 2) == slot
    if QUANT:
        cb = tl.load(d_ptr + rn[:, None] * stride_d + g[None, :], mask=mask, other=0).to(tl.int32)
        code = tl.where(is0, cb & 15, cb >> 4).to(tl.float32)
        soff = rn[:, None] * stride_s + ((g * 4) // GS)[None, :]
        s = tl.load(s_ptr + soff, mask=mask, other=0).to(tl.float32)
        if SYM:
            z = 8.0
        else:
            z = tl.load(z_ptr + soff, mask=mask, other=0).to(tl.float32)
        w = (code - z) * s
    else:
        idx = rn[:, None] * stride_d + (2 * g)[None, :] + tl.where(is0, 0, 1)
        w = tl.load(d_ptr + idx, mask=mask, other=0).to(tl.float32)
    return tl.where(is0 | is1, w, 0.0)


@triton.jit
def _mm_kernel(x_ptr, d_ptr, p_ptr, s_ptr, z_ptr, out_ptr, M, N, K, GS, stride_xm, stride_d, stride_p, stride_s,
               QUANT: tl.constexpr, SYM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mmask = rm < M
    nmask = rn < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        kmask = rk < K
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=mmask[:, None] & kmask[None, :], other=0)
        w = _weight_tile(d_ptr, p_ptr, s_ptr, z_ptr, rn, rk, nmask, kmask, GS, stride_d, stride_p, stride_s,
                         QUANT, SYM)
        acc += tl.dot(x, tl.trans(w.to(x_ptr.dtype.element_ty)))
    out = out_ptr + rm[:, None] * N + rn[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mmask[:, None] & nmask[None, :])


@triton.jit
def _decode_kernel(d_ptr, p_ptr, s_ptr, z_ptr, out_ptr, N, K, GS, stride_d, stride_p, stride_s,
                   QUANT: tl.constexpr, SYM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    nmask = rn < N
    kmask = rk < K
    w = _weight_tile(d_ptr, p_ptr, s_ptr, z_ptr, rn, rk, nmask, kmask, GS, stride_d, stride_p, stride_s, QUANT, SYM)
    tl.store(out_ptr + rn[:, None] * K + rk[None, :], w.to(out_ptr.dtype.element_ty),
             mask=nmask[:, None] & kmask[None, :])
