"""Issue #25: what is left of the CPU compress time that the code could still cut without changing a bit of the
output. On SmolLM2-135M's block shapes and the README's calibration size (128 x 512 tokens), float32, the
process's threads:

1. one Llama block's forward (sdpa attention, no mask: the causal path), with torch's op profile: the matrix
   products' share and rate;
2. a 1536-column Hessian (down_proj's input) as the solver forms it (16 groups of 4096 tokens, each group's
   ``X^T X`` on the upper block triangle, added in float64): finer block partitions and the full product, bits and
   times; the products' rate;
3. the inverse Cholesky factor of that Hessian on 1 thread and on 2: the same bits or not.

All under ``hostmem.reuse_freed_memory``, as the pipeline's CPU runs.

    python -m benchmarks.experiments.cpu_floor
"""
from __future__ import annotations

import time

import torch

TOKENS, SEQ, HIDDEN, INTER = 128 * 512, 512, 576, 1536


def _best(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def block_forward() -> None:
    from torch.profiler import ProfilerActivity, profile
    from transformers import AutoConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    cfg = AutoConfig.for_model("llama", hidden_size=HIDDEN, intermediate_size=INTER, num_attention_heads=9,
                               num_key_value_heads=3, num_hidden_layers=1, vocab_size=100, max_position_embeddings=2048)
    cfg._attn_implementation = "sdpa"
    layer = LlamaDecoderLayer(cfg, 0).eval()
    x = torch.randn(TOKENS // SEQ, SEQ, HIDDEN)
    pe = LlamaRotaryEmbedding(cfg)(x[:1], torch.arange(SEQ)[None])
    with torch.no_grad():
        wall = _best(lambda: layer(x, position_embeddings=pe, attention_mask=None), 2)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            layer(x, position_embeddings=pe, attention_mask=None)
    ops = {e.key: e.self_cpu_time_total / 1e6 for e in prof.key_averages()}
    total = sum(ops.values())
    flops = 2 * TOKENS * (2 * HIDDEN * HIDDEN + 2 * HIDDEN * HIDDEN // 3 + 3 * HIDDEN * INTER)
    print(f"block forward: {wall:.2f} s (best of 2); profile {total:.2f} s, of which aten::mm {ops.get('aten::mm', 0):.2f} s "
          f"= {flops / ops.get('aten::mm', 1) / 1e9:.0f} GFLOP/s on {flops / 1e9:.0f} GFLOP")
    for k, v in sorted(ops.items(), key=lambda kv: -kv[1])[:6]:
        print(f"  {k:50s} {v:6.3f} s")


def _upper(total: torch.Tensor, x: torch.Tensor, nb: int) -> None:
    d = x.shape[1]
    cuts = [(i * d) // nb for i in range(nb + 1)]
    for i in range(nb):
        a, b = cuts[i], cuts[i + 1]
        for j in range(i, nb):
            c, e = cuts[j], cuts[j + 1]
            blk = x[:, a:b].t().matmul(x[:, c:e])
            total[a:b, c:e].add_(blk)
            if j > i:
                total[c:e, a:b].add_(blk.t())


def _all_groups(total: torch.Tensor, groups, nb: int) -> None:
    total.zero_()
    for x in groups:
        _upper(total, x, nb)


def hessian() -> torch.Tensor:
    from sparsegpt_export.solver import HessianAccumulator

    g = torch.Generator().manual_seed(0)
    X = torch.randn(TOKENS, INTER, generator=g) * torch.rand(INTER, generator=g) * 3
    acc = HessianAccumulator(INTER, name="down")
    t = time.perf_counter()
    acc.add(X, TOKENS // SEQ)
    ref, _ = acc.total()
    print(f"Hessian {INTER} columns, as the solver forms it: {time.perf_counter() - t:.2f} s")
    groups = X.split(4096)
    for nb in (4, 6, 8, 12):
        total = torch.zeros(INTER, INTER, dtype=torch.float64)
        dt = _best(lambda: _all_groups(total, groups, nb), 2)
        work = (nb * (nb + 1) / 2) / nb**2
        print(f"  upper triangle in {nb}x{nb} blocks ({work:.0%} of the full product): {dt:.2f} s, "
              f"{2 * TOKENS * INTER * INTER * work / dt / 1e9:.0f} GFLOP/s, same bits: {torch.equal(total, ref)}")
    full = torch.zeros(INTER, INTER, dtype=torch.float64)
    dt = _best(lambda: [full.add_(x.t().matmul(x)) for x in groups] and None, 1)
    print(f"  full product per group: {dt:.2f} s, {2 * TOKENS * INTER * INTER / dt / 1e9:.0f} GFLOP/s")
    return acc.H


def cholesky_threads(H: torch.Tensor) -> None:
    from sparsegpt_export.solver.obs import _inverse_cholesky

    n = torch.get_num_threads()
    out = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        dt = _best(lambda: out.__setitem__(threads, _inverse_cholesky(H, 0.01, "down")[0]), 2)
        print(f"inverse Cholesky factor, {INTER} columns, {threads} thread(s): {dt * 1e3:.0f} ms")
    torch.set_num_threads(n)
    print(f"  same bits on 1 and 2 threads: {torch.equal(out[1], out[2])}, largest difference "
          f"{(out[1] - out[2]).abs().max().item():.2e}")


def main() -> None:
    from sparsegpt_export import hostmem

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {TOKENS} tokens")
    with hostmem.reuse_freed_memory():  # as the pipeline's CPU runs
        block_forward()
        cholesky_threads(hessian())


if __name__ == "__main__":
    main()
