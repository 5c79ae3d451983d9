"""Compile the Triton kernels ahead of time for a CUDA architecture, without a GPU (triton's own compiler and
ptxas), with the launch configurations of `ops`: ``python -m sparsegpt_export.kernels.aot [--arch 80,90] [--all]
[--regs]``. Catches kernels that the interpreter runs but the compiler rejects; ``--regs`` prints ptxas's
registers and spills per kernel. Must run without ``TRITON_INTERPRET``."""
from __future__ import annotations

import argparse
import functools
import itertools
import sys

_COMMON = {"GS": "i32", "stride_d": "i32", "stride_p": "i32", "stride_s": "i32"}


def _signature(kernel: str, quant: bool, dtype: str) -> dict[str, str]:
    ptrs = {"d_ptr": "*u8" if quant else f"*{dtype}", "p_ptr": "*u8", "s_ptr": "*fp16" if quant else f"*{dtype}",
            "z_ptr": "*u8" if quant else f"*{dtype}"}
    if kernel == "gemv":
        return {"x_ptr": f"*{dtype}", **ptrs, "out_ptr": "*fp32", "N": "i32", "G": "i32", "GS": "i32",
                "G_PER_SPLIT": "i32", "stride_xm": "i32", "stride_d": "i32", "stride_p": "i32", "stride_s": "i32"}
    if kernel == "mm":
        return {"x_ptr": f"*{dtype}", **ptrs, "out_ptr": f"*{dtype}", "M": "i32", "N": "i32", "K": "i32",
                "stride_xm": "i32", **_COMMON}
    return {**ptrs, "out_ptr": f"*{dtype}", "N": "i32", "K": "i32", **_COMMON}


def _launch_config(kernel: str, m: int = 16) -> dict[str, int]:
    from . import ops

    return dict({"gemv": ops.GEMV, "decode": ops.DECODE}.get(kernel) or ops.tiled_config(m))


def compile_kernel(kernel: str, quant: bool, sym: bool, dtype: str, arch: int, m: int = 16,
                   tile_scale: bool = True):
    """Compile one kernel configuration for ``sm<arch>`` (the tiled kernel with its blocks for ``m`` rows);
    returns triton's compiled kernel (``.asm["ptx"]``, ``.asm["cubin"]``)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from . import triton_kernels as tk

    fn = {"gemv": tk._gemv_kernel, "mm": tk._mm_kernel, "decode": tk._decode_kernel}[kernel]
    cfg = _launch_config(kernel, m)
    warps = cfg.pop("num_warps")
    gemv = {"TILE_SCALE": quant and tile_scale, "ATOMIC": tile_scale} if kernel == "gemv" else {}
    const = {"QUANT": quant, "SYM": sym, **cfg, **gemv}
    sig = {**_signature(kernel, quant, dtype), **{k: "constexpr" for k in const}}
    if gemv and not gemv["ATOMIC"]:
        sig["out_ptr"] = f"*{dtype}"
    return triton.compile(ASTSource(fn, signature=sig, constexprs=const), target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": warps})


def registers(compiled, arch: int) -> str:
    """ptxas's line on registers and spills for a compiled kernel (triton's bundled ptxas)."""
    import os
    import subprocess
    import tempfile

    import triton

    folder = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "k.ptx")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        for exe in ("ptxas-blackwell", "ptxas"):
            out = subprocess.run([os.path.join(folder, exe), "-v", f"--gpu-name=sm_{arch}{'a' if arch >= 90 else ''}",
                                  ptx, "-o", os.devnull], capture_output=True, text=True)
            if out.returncode == 0:
                return " ".join(l.split("ptxas info    :")[-1].strip() for l in out.stderr.splitlines()
                                if "registers" in l or "spill" in l)
    return "ptxas could not read the PTX"


def configurations(full: bool) -> list[tuple]:
    """(kernel, quant, sym, dtype) to compile; a gemv entry with a 5th item False: without TILE_SCALE (groups
    that do not hold whole tiles) and without atomics (one K slice)."""
    if full:
        base = [(k, q, s, d) for k, q, s, d in itertools.product(("gemv", "mm", "decode"), (True, False),
                                                                 (True, False), ("fp16", "bf16")) if q or s]
    else:
        base = [(k, q, s, d) for k in ("gemv", "mm", "decode") for q, s, d in ((True, False, "bf16"), (False, True, "fp16"))]
    return base + [("gemv", True, True, "fp16", 16, False)]


SWEEP_SIGNATURE = {"w_ptr": "*fp32", "stride_w": "i32", "u_ptr": "*fp32", "su0": "i32", "su1": "i32", "mask_ptr": "*u8",
                   "stride_m": "i32", "e_ptr": "*fp32", "stride_e": "i32", "s_ptr": "*fp32", "lo_ptr": "*fp32",
                   "hi_ptr": "*fp32", "rows": "i32", "count": "i32"}
# (N, M, CHOOSE, QUANT): the mask sweep (2:4, 4:8), the sweep that quantizes on a fixed mask, the joint 2:4 + grid one
SWEEPS = ((2, 4, True, False), (4, 8, True, False), (0, 1, False, True), (2, 4, True, True))


def compile_sweep(n: int, m: int, choose: bool, quant: bool, arch: int):
    """Compile the column sweep's block kernel (`solver.sweep_kernel`) for ``sm<arch>`` as `sweep_block` launches
    it on a GPU."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from ..solver import sweep_kernel as sk

    const = {"N": n, "M": m, "CHOOSE": choose, "QUANT": quant, "BR": sk.BLOCK_ROWS, "BB": 128}
    sig = {**SWEEP_SIGNATURE, **{k: "constexpr" for k in const}}
    return triton.compile(ASTSource(sk._sweep_block_kernel, signature=sig, constexprs=const),
                          target=GPUTarget("cuda", arch, 32), options={"num_warps": sk.NUM_WARPS, "enable_fp_fusion": False})


def _report(arch: int, what: str, build, regs: bool) -> int:
    """Compile one kernel, print its line; 1 when it failed."""
    try:
        compiled = build()
        extra = f"; {registers(compiled, arch)}" if regs else ""
        print(f"sm{arch} {what}: cubin {len(compiled.asm['cubin'])} bytes{extra}", flush=True)
        return 0
    except Exception as e:  # noqa: BLE001 - reported, counted
        print(f"sm{arch} {what}: FAILED {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        return 1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sparsegpt_export.kernels.aot")
    ap.add_argument("--arch", default="80,90", help="compute capabilities, comma-separated (default 80,90)")
    ap.add_argument("--all", action="store_true", help="every sym/asym x fp16/bf16 configuration")
    ap.add_argument("--regs", action="store_true", help="print ptxas's registers and spills per kernel")
    args = ap.parse_args(argv)
    failed = 0
    for arch in (int(a) for a in args.arch.split(",")):
        for cfg in configurations(args.all):
            extra = " (no TILE_SCALE)" if cfg[4:] else ""
            failed += _report(arch, f"{cfg[0]}{extra} quant={cfg[1]} sym={cfg[2]} {cfg[3]}",
                              functools.partial(compile_kernel, *cfg[:4], arch, *cfg[4:]), args.regs)
        for n, m, choose, quant in SWEEPS:
            failed += _report(arch, f"sweep {f'{n}:{m}' if choose else 'fixed mask'} quant={quant}",
                              functools.partial(compile_sweep, n, m, choose, quant, arch), args.regs)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
