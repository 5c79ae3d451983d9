"""Layer-level comparison of weight updates for strict 2:4 on real SmolLM2-135M layers (how the ADMM defaults
were chosen).

    python -m benchmarks.experiments.admm_variants [--windows 16] [--threads 2]

Captures the Hessians ``2 X^T X / n`` of five linear layers (blocks 2 and 15) from the first ``--windows`` fixed
C4 calibration windows on the dense model, then prunes each layer to 2:4 with SparseGPT's OBS sweep and with
ADMM variants, and prints each variant's layer error ``tr(dW H dW^T) / tr(W H W^T)`` relative to the OBS sweep's
(lower is better). The errors are deterministic; times are printed for orientation only.
"""
from __future__ import annotations

import argparse
import time

import torch

from sparsegpt_export.solver import HessianAccumulator, admm_prune, layer_error, sparsegpt_solve

LAYERS = ("model.layers.2.self_attn.q_proj", "model.layers.2.mlp.gate_proj", "model.layers.2.mlp.down_proj",
          "model.layers.15.self_attn.o_proj", "model.layers.15.mlp.down_proj")
VARIANTS = {  # name: admm_prune keyword arguments
    "admm fixed OBS mask, 40 it.": dict(iters=40, fixed=True),
    "admm gradual |W+U|-like, 20 it., damp 0.1 (v0)": dict(iters=20, mask_steps=15, damp=0.1, magnitude=True),
    "admm gradual OBS saliency, 20 it.": dict(iters=20, mask_steps=15),
    "admm gradual OBS saliency, 40 it. (default)": dict(iters=40, mask_steps=30),
    "admm gradual OBS saliency, 100 it.": dict(iters=100, mask_steps=75),
}


def main() -> int:
    from safetensors.torch import load_file

    from benchmarks.protocol import CALIB
    from sparsegpt_export.models import load_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, _ = load_model("smollm2-135m")
    calib = load_file(str(CALIB))["input_ids"][:args.windows]
    modules = dict(model.named_modules())
    accs = {n: HessianAccumulator(modules[n].in_features, name=n) for n in LAYERS}
    hooks = [modules[n].register_forward_pre_hook(lambda _m, a, n=n: accs[n].add(a[0].detach())) for n in LAYERS]
    with torch.no_grad():
        for i in range(0, calib.shape[0], 4):
            model(input_ids=calib[i:i + 4], use_cache=False)
    for h in hooks:
        h.remove()
    print(f"2:4 layer error relative to SparseGPT's OBS sweep (lower is better); Hessians from {calib.shape[0]} x "
          f"{calib.shape[1]} calibration tokens")
    for name in LAYERS:
        W, H = modules[name].weight.detach().float(), accs[name].H
        obs = sparsegpt_solve(W, H, n=2, m=4)
        print(f"{name}  (OBS rel. error {obs.rel_error:.5f})")
        for label, kw in VARIANTS.items():
            kw = dict(kw)
            t0 = time.perf_counter()
            if kw.pop("fixed", False):
                Wa, _ = admm_prune(W, H, n=2, m=4, mask=obs.mask, **kw)
            elif kw.pop("magnitude", False):
                Wa = _magnitude_variant(W, H, **kw)
            else:
                Wa, _ = admm_prune(W, H, n=2, m=4, **kw)
            print(f"  {label:48s} {layer_error(Wa, W, H) / obs.rel_error:.3f}   ({time.perf_counter() - t0:.1f} s)")
    return 0


def _magnitude_variant(W, H, iters, mask_steps, damp):
    """The first ADMM version (commit 418eed2): gradual mask by |W + U| in the scaled coordinates."""
    from sparsegpt_export.solver import _choose_nm, _choose_unstructured

    cols = W.shape[1]
    norm = torch.diag(H).clamp(min=1e-12).sqrt()
    Hn = H / norm[:, None] / norm[None, :]
    idx = torch.arange(cols)
    Hn[idx, idx] += damp * torch.diag(Hn).mean()
    Wn = W * norm[None, :]
    target = Wn @ Hn
    A = Hn.clone()
    A[idx, idx] += 1.0
    Ainv = torch.linalg.inv(A)
    X, U, keep = Wn.clone(), torch.zeros_like(Wn), None
    for t in range(iters):
        if t < mask_steps:
            cur = 0.5 * (1 - (1 - (t + 1) / mask_steps) ** 3)
            score = (X + U).abs()
            score = score.masked_fill(~_choose_nm(score, 2, 4), float("inf"))
            keep = ~_choose_unstructured(score, round(cur * score.numel()))
        Z = (X + U) * keep
        U = U + X - Z
        X = (target + (Z - U)) @ Ainv
    return ((X + U) * keep) / norm[None, :]


if __name__ == "__main__":
    raise SystemExit(main())
