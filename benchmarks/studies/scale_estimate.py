"""An ESTIMATE (not a measurement) of the time and memory of compressing Llama-3-8B and Llama-3-70B (issue #8).

Work model, per transformer block with N calibration tokens (FLOPs):

- Hessians: 2·N·c² for each distinct layer input of c columns (q/k/v share one, gate/up share one);
- solve: (4/3)·c³ (Cholesky, inverse, Cholesky) + 2·r·c² (the OBS sweep) for each r × c layer;
- block forward: 2·N·(block parameters) + 2·N·S·h (causal attention, S = window length, h = hidden).

The rates are measured: ``benchmarks/results/scale.json`` (``benchmarks/scale.py``, the random 3 GB Llama on this
machine) gives each layer's solve time and the profile's Hessian and forward times, so this machine's effective
FLOP/s for the three kinds of work follow, and the fit is shown per layer shape. For the H100 no measurement
exists in this project (no GPU has been lent to it), so its rates are ASSUMPTIONS, printed with the result:
sustained fractions of the H100 SXM's peaks (FP32 67 TFLOP/s for the solve and the Hessians, which run in
float32; BF16 dense 989 TFLOP/s for the forwards). With 8 GPUs the windows split 8 ways (Hessians and forwards),
the layers of a group are solved on different ranks, or each layer's rows split across them where whole
layers do not share out evenly (the critical path is the busiest rank of each group, as the driver schedules it), and each
group's Hessian is all-reduced in float64 (ring, at an assumed 150 GB/s per GPU).

The N-rank rows are then corrected by what several ranks MEASURED (issue #28): ``split_invariance.json``
(``benchmarks/studies/split_invariance.py``: SmolLM2, one process against ``torchrun`` with 2 processes, each with
its per-rank profile) gives, per kind of work, the speedup of the busiest rank over one process; divided by the
speedup expected on the same 2 cores, that is the measured parallel efficiency (capped at 1), applied to the
8-rank row as ``time / efficiency`` for each kind. Expected: for the solves, which one process runs on one thread
and each rank on its own core, the speedup this work model predicts for the shapes and 2 ranks; for the Hessians
and the block forwards, which one process already runs on both cores, 1x.

    python -m benchmarks.studies.scale_estimate [--scale benchmarks/results/scale.json]
        [--ranks benchmarks/results/split_invariance.json] [--out benchmarks/results]

Writes ``<out>/scale_estimate.md`` and ``.json``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from benchmarks.protocol import RESULTS

MODELS = {  # hidden, ffn, kv dim (heads x head_dim), blocks, vocab
    "Llama-3-8B": (4096, 14336, 1024, 32, 128256),
    "Llama-3-70B": (8192, 28672, 1024, 80, 128256),
}
H100 = {"solve": 0.30 * 67e12, "hessian": 0.60 * 67e12, "forward": 0.30 * 989e12, "allreduce_Bps": 150e9}


def block_layers(h: int, f: int, kv: int) -> list[tuple[str, int, int, str]]:
    """(name, rows, cols, input group) of one Llama block."""
    return [("q_proj", h, h, "attn_in"), ("k_proj", kv, h, "attn_in"), ("v_proj", kv, h, "attn_in"),
            ("o_proj", h, h, "attn_out"), ("gate_proj", f, h, "mlp_in"), ("up_proj", f, h, "mlp_in"),
            ("down_proj", h, f, "mlp_out")]


def solve_flops(r: int, c: int) -> float:
    return 4.0 / 3.0 * c ** 3 + 2.0 * r * c * c


def block_work(h: int, f: int, kv: int, tokens: int, seqlen: int) -> dict:
    layers = block_layers(h, f, kv)
    cols = {g: c for _, _, c, g in layers}
    params = sum(r * c for _, r, c, _ in layers)
    return {
        "layers": layers, "params": params,
        "hessian": sum(2.0 * tokens * c * c for c in cols.values()),
        "solve": sum(solve_flops(r, c) for _, r, c, _ in layers),
        "forward": 2.0 * tokens * params + 2.0 * tokens * seqlen * h,
        "max_cols": max(cols.values()), "group_cols": cols,
    }


def group_critical_path(shapes: list[tuple[int, int]], world: int) -> float:
    """FLOPs on the busiest rank for one group of layers sharing an input, as the driver schedules it: whole layers
    on owners (largest first), or, when that leaves a rank with over 1.2x the mean load, every layer's rows split
    across the ranks (2:4 with the OBS sweep is row by row; the factorisation is then done on every rank)."""
    from sparsegpt_export.distributed import owners

    sizes = [r * c * c for r, c in shapes]
    own = owners([str(i) for i in range(len(shapes))], sizes, world)
    load = [sum(solve_flops(r, c) for (r, c), o in zip(shapes, own) if o == k) for k in range(world)]
    if max(sum(sz for sz, o in zip(sizes, own) if o == k) for k in range(world)) * world > 1.2 * sum(sizes):
        return sum(4.0 / 3.0 * c ** 3 + 2.0 * r * c * c / world for r, c in shapes)
    return max(load)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scale", default=str(RESULTS / "scale.json"))
    ap.add_argument("--ranks", default=str(RESULTS / "split_invariance.json"),
                    help="split_invariance.json with a one-process and a 2-process run and their per-rank profiles")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    args = ap.parse_args()
    m = json.loads(Path(args.scale).read_text())
    sm, cal = m["model"], m["calibration"]
    tokens_meas = cal["nsamples"] * cal["seqlen"]
    meas = block_work(sm["hidden"], sm["ffn"], sm["hidden"] * sm.get("kv_heads", sm["heads"]) // sm["heads"],
                      tokens_meas, cal["seqlen"])
    # this machine's rates, from the --offload disk run
    by_shape: dict[tuple, list[float]] = {}
    for row in m["disk_layers"]:
        by_shape.setdefault(tuple(row["shape"]), []).append(row["time_s"])
    solve_s = sum(sum(v) for v in by_shape.values())
    solve_fl = sum(solve_flops(*shape) * len(v) for shape, v in by_shape.items())
    rate = {"solve": solve_fl / solve_s,
            "hessian": meas["hessian"] * sm["layers"] / max(m["disk_profile"]["hessian_s"], 1e-9),
            "forward": meas["forward"] * sm["layers"] / max(m["disk_profile"]["block_forward_s"], 1e-9)}
    lines = ["# Compression time and memory for Llama-3-8B / 70B: an ESTIMATE", "",
             f"From `python -m benchmarks.studies.scale_estimate` on `{Path(args.scale).name}` (measured: random Llama "
             f"{sm['layers']} x {sm['hidden']} x {sm['ffn']}, {cal['nsamples']} x {cal['seqlen']} tokens, "
             f"{m['machine']}). Calibration assumed here: {args.nsamples} x {args.seqlen} tokens; 2:4 + 4-bit.", "",
             "Rates measured on this machine (effective FLOP/s of the work model in the script's docstring):", "",
             "| work | GFLOP/s |", "|---|---|"]
    lines += [f"| {k} | {v / 1e9:.1f} |" for k, v in rate.items()]
    lines += ["", "Fit of the solve model per layer shape (measured median s / predicted s at the fitted rate):", "",
              "| shape [out, in] | layers | measured median s | predicted s |", "|---|---|---|---|"]
    for shape, v in sorted(by_shape.items()):
        v = sorted(v)
        lines.append(f"| {list(shape)} | {len(v)} | {v[len(v) // 2]:.2f} | {solve_flops(*shape) / rate['solve']:.2f} |")
    eff, eff_lines = rank_efficiency(Path(args.ranks))
    lines += eff_lines
    lines += ["", "ASSUMED H100 SXM rates (no GPU measured in this project): solve "
              f"{H100['solve'] / 1e12:.0f} TFLOP/s, Hessians {H100['hessian'] / 1e12:.0f} TFLOP/s (float32), forwards "
              f"{H100['forward'] / 1e12:.0f} TFLOP/s (bf16), all-reduce {H100['allreduce_Bps'] / 1e9:.0f} GB/s per GPU.", "",
              "| model | where | time (estimate) | compute-device memory (estimate) | host memory, --offload cpu | "
              "host memory, --offload disk |", "|---|---|---|---|---|---|"]
    out = {"rates_measured_flops": rate, "h100_assumed": H100, "rank_efficiency_measured": eff, "models": {}}
    tokens = args.nsamples * args.seqlen
    for name, (h, f, kv, nb, vocab) in MODELS.items():
        w = block_work(h, f, kv, tokens, args.seqlen)
        total_params = nb * w["params"] + 2 * vocab * h
        block_b = 2 * w["params"]  # bf16 weights
        acts_b = 2 * tokens * h * 2  # a block's inputs and outputs in bf16
        hess_b = 4 * 4 * w["max_cols"] ** 2  # H, its factor, the inverse factor and a work copy in float32
        dev_b = block_b + acts_b + hess_b
        host_cpu = 2 * total_params
        host_disk = block_b + 2 * vocab * h // 2 + (1 << 30)  # one block, the embedding while capturing, ~1 GB process
        est = {}
        est["this CPU (measured rates)"] = nb * (w["solve"] / rate["solve"] + w["hessian"] / rate["hessian"]
                                                 + w["forward"] / rate["forward"])
        est["1 x H100 (assumed rates)"] = nb * (w["solve"] / H100["solve"] + w["hessian"] / H100["hessian"]
                                                + w["forward"] / H100["forward"])
        per_group = {g: group_critical_path([(r, c) for _, r, c, gg in w["layers"] if gg == g], 8)
                     for g in w["group_cols"]}
        comm = sum(2 * 8 * c * c * 7 / 8 for c in w["group_cols"].values()) / H100["allreduce_Bps"]
        est["8 x H100 (assumed rates)"] = nb * (sum(per_group.values()) / H100["solve"] + w["hessian"] / 8 / H100["hessian"]
                                                + w["forward"] / 8 / H100["forward"] + comm)
        if eff:
            est["8 x H100 (assumed rates, measured 2-rank efficiency)"] = nb * (
                sum(per_group.values()) / H100["solve"] / eff["solve"]
                + w["hessian"] / 8 / H100["hessian"] / eff["hessian"]
                + w["forward"] / 8 / H100["forward"] / eff["forward"] + comm)
        out["models"][name] = {"params": total_params, "seconds": est, "device_bytes": dev_b,
                               "host_bytes_offload_cpu": host_cpu, "host_bytes_offload_disk": host_disk}
        for where, sec in est.items():
            lines.append(f"| {name} ({total_params / 1e9:.1f} B) | {where} | {_dur(sec)} | "
                         f"{dev_b / 2**30:.1f} GiB | {host_cpu / 2**30:.0f} GiB | {host_disk / 2**30:.1f} GiB |")
    lines += ["", "Memory: one block's bf16 weights + the calibration activations in and out (bf16; spilled to host "
              "memory beyond `--max-memory`) + the largest Hessian with its factorisations (float32); chunked "
              "forward intermediates come on top and are bounded by the automatic batch size. Host, `--offload cpu`: "
              "the whole bf16 model; `--offload disk`: one block, the embedding while the first block's inputs are "
              "captured, and about 1 GB of process (measured ratio on the 3 GB model: see scale.md). With N ranks "
              "the activations split N ways; each rank holds one block."]
    text = "\n".join(lines) + "\n"
    Path(args.out, "scale_estimate.md").write_text(text)
    Path(args.out, "scale_estimate.json").write_text(json.dumps(out, indent=2) + "\n")
    print(text)
    return 0


SMOLLM2 = (576, 1536, 192, 30)  # hidden, ffn, kv dim, blocks: the model split_invariance.json measured


def rank_efficiency(path: Path) -> tuple[dict, list[str]]:
    """Measured 2-rank parallel efficiency per kind of work (see the module docstring) and its table lines;
    ``({}, [])`` when the file is missing or has no 2-process run with per-rank profiles."""
    if not path.exists():
        return {}, []
    runs = json.loads(path.read_text())
    one = next((r for r in runs.values() if r.get("world_size") == 1 and r.get("calib_batch_size") == 128), None)
    two = next((r for r in runs.values() if r.get("world_size") == 2 and r.get("profile_by_rank")), None)
    if one is None or two is None:
        return {}, []
    h, f, kv, _ = SMOLLM2
    layers = block_layers(h, f, kv)
    groups = {g for *_, g in layers}
    shapes = {g: [(r, c) for _, r, c, gg in layers if gg == g] for g in groups}
    predicted = {"solve": sum(group_critical_path(shapes[g], 1) for g in groups)
                 / sum(group_critical_path(shapes[g], 2) for g in groups),
                 "hessian": 1.0, "forward": 1.0}  # one process already uses both cores for these
    keys = {"solve": "solve_s", "hessian": "hessian_s", "forward": "block_forward_s"}
    eff, lines = {}, ["", f"Measured on 2 ranks (`{path.name}`: SmolLM2, one process against torchrun with 2 "
                          "processes on this machine's 2 cores; busiest rank per kind of work):", "",
                      "| work | one process s | busiest rank s | measured speedup | expected speedup | efficiency used |",
                      "|---|---|---|---|---|---|"]
    for kind, key in keys.items():
        t1 = one["profile"][key]
        t2 = max(p[key] for p in two["profile_by_rank"])
        speed = t1 / t2
        eff[kind] = min(1.0, speed / predicted[kind])
        lines.append(f"| {kind} | {t1:.1f} | {t2:.1f} | {speed:.2f}x | {predicted[kind]:.2f}x | {eff[kind]:.2f} |")
    return eff, lines


def _dur(s: float) -> str:
    return f"{s / 3600:.1f} h" if s >= 3600 else f"{s / 60:.1f} min"


if __name__ == "__main__":
    sys.exit(main())
