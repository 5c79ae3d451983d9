"""The kernels as PyTorch custom ops (``torch.ops.sparsegpt.*``), with fake implementations, so that
``torch.compile`` traces them and CUDA graphs capture them (no host sync inside; outputs allocated on the device).

- ``sparsegpt::int4_24_mm(x, codes, positions, scales, zeros, group_size, variant)``
- ``sparsegpt::fp16_24_mm(x, values, positions, variant)``

``x`` is 2-D and contiguous ([M, K]); the result is [M, N] in ``x``'s dtype. ``variant``:
``"gemv"`` (split-K, decode), ``"tiled"`` (``tl.dot``), ``"decode"`` (the dense weight rebuilt by a kernel, then
``F.linear``) run the Triton kernels (CUDA, or CPU tensors under ``TRITON_INTERPRET=1``); ``"torch"`` is the
pure-torch reference (any device, no triton).
"""
import functools
import os
from typing import Optional

import torch
import torch.nn.functional as F

from . import layout

VARIANTS = ("gemv", "tiled", "decode", "torch")
# launch configurations: compiled for sm90 without spills (``python -m sparsegpt_export.kernels.aot --regs``);
# not tuned on a GPU yet
GEMV = {"BLOCK_N": 64, "BLOCK_G": 32, "num_warps": 8}  # 32 groups = 128 inputs: one scale per tile at g128
TILED = {16: {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 8},
         32: {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 8},
         64: {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 32, "num_warps": 8}}
DECODE = {"BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 8}


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


def gemv_split(n_blocks: int, m: int, groups: int, block_g: int, device: torch.device) -> int:
    """Split-K so that about four programs per SM run, each with at least one block of groups."""
    want = max(1, (4 * _sm_count(device)) // max(1, n_blocks * m))
    return max(1, min(want, -(-groups // block_g)))


def _launch_gemv(x, data, positions, scales, zeros, gs, quant, split_k=None, block_n=GEMV["BLOCK_N"],
                 block_g=GEMV["BLOCK_G"]):
    import triton

    from . import triton_kernels as tk

    m, k = x.shape
    n, groups = positions.shape[0], k // 4
    n_blocks = triton.cdiv(n, block_n)
    split = split_k or gemv_split(n_blocks, m, groups, block_g, x.device)
    per_split = triton.cdiv(triton.cdiv(groups, split), block_g) * block_g
    split = triton.cdiv(groups, per_split)
    out = torch.zeros(m, n, device=x.device, dtype=torch.float32) if split > 1 else x.new_empty(m, n)
    s = scales if quant else data
    tk._gemv_kernel[(n_blocks, split, m)](
        x, data, positions, s, zeros if zeros is not None else s, out, n, groups, gs, per_split, x.stride(0),
        data.stride(0), positions.stride(0), s.stride(0), QUANT=quant, SYM=zeros is None, BLOCK_N=block_n,
        BLOCK_G=block_g, TILE_SCALE=quant and gs % (4 * block_g) == 0, ATOMIC=split > 1, num_warps=GEMV["num_warps"])
    return out.to(x.dtype)


def tiled_config(m: int) -> dict[str, int]:
    """The tiled kernel's blocks and warps for ``m`` rows."""
    return TILED[16 if m <= 16 else (32 if m <= 32 else 64)]


def _launch_tiled(x, data, positions, scales, zeros, gs, quant):
    import triton

    from . import triton_kernels as tk

    m, k = x.shape
    n = positions.shape[0]
    cfg = tiled_config(m)
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    out = torch.empty(m, n, device=x.device, dtype=x.dtype)
    s = scales if quant else data
    tk._mm_kernel[(triton.cdiv(m, bm), triton.cdiv(n, bn))](
        x, data, positions, s, zeros if zeros is not None else s, out, m, n, k, gs, x.stride(0), data.stride(0),
        positions.stride(0), s.stride(0), QUANT=quant, SYM=zeros is None, **cfg)
    return out


def decode_weight(data, positions, scales, zeros, gs, k, dtype, quant):
    """The dense weight [N, K] in ``dtype``, rebuilt by the decode kernel."""
    import triton

    from . import triton_kernels as tk

    n = positions.shape[0]
    w = torch.empty(n, k, device=positions.device, dtype=dtype)
    s = scales if quant else data
    bn, bk = DECODE["BLOCK_N"], DECODE["BLOCK_K"]
    tk._decode_kernel[(triton.cdiv(n, bn), triton.cdiv(k, bk))](
        data, positions, s, zeros if zeros is not None else s, w, n, k, gs, data.stride(0), positions.stride(0),
        s.stride(0), QUANT=quant, SYM=zeros is None, **DECODE)
    return w


def _run(x, data, positions, scales, zeros, gs, variant, quant):
    if variant == "gemv":
        return _launch_gemv(x, data, positions, scales, zeros, gs, quant)
    if variant == "tiled":
        return _launch_tiled(x, data, positions, scales, zeros, gs, quant)
    if variant == "decode":
        return F.linear(x, decode_weight(data, positions, scales, zeros, gs, x.shape[1], x.dtype, quant))
    if variant == "torch":
        kind, t = (layout.INT4, {"codes": data, "positions": positions, "scales": scales, "zeros": zeros}) if quant \
            else (layout.FP16, {"values": data, "positions": positions})
        return F.linear(x, layout.dense_from_layout(kind, t, x.shape[1], gs, x.dtype))
    raise ValueError(f"unknown kernel variant {variant!r} (one of {', '.join(VARIANTS)})")


@torch.library.custom_op("sparsegpt::int4_24_mm", mutates_args=())
def int4_24_mm(x: torch.Tensor, codes: torch.Tensor, positions: torch.Tensor, scales: torch.Tensor,
               zeros: Optional[torch.Tensor], group_size: int, variant: str) -> torch.Tensor:
    return _run(x, codes, positions, scales, zeros, group_size, variant, True)


@int4_24_mm.register_fake
def _(x, codes, positions, scales, zeros, group_size, variant):
    return x.new_empty(x.shape[0], positions.shape[0])


@torch.library.custom_op("sparsegpt::fp16_24_mm", mutates_args=())
def fp16_24_mm(x: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, variant: str) -> torch.Tensor:
    return _run(x, values, positions, None, None, 4, variant, False)


@fp16_24_mm.register_fake
def _(x, values, positions, variant):
    return x.new_empty(x.shape[0], positions.shape[0])
