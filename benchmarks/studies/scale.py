"""Benchmark (issue #8): a model larger than we want in memory, compressed with ``--offload disk``, and the same
compression on 1 and 2 processes (torchrun, gloo).

A random Llama-architecture model of about 3 GB in float32 (weights random: time and memory do not depend on the
values) is saved to disk as sharded safetensors, with random calibration tokens. Three runs of
``python -m sparsegpt_export compress`` (2:4 + 4-bit g128), each its own process:

1. ``--offload cpu``: the whole model in host memory (the reference output);
2. ``--offload disk``: the model streamed block by block from its files;
3. ``torchrun --nproc-per-node 2 ... --offload disk``: the windows split across two ranks.

Reported: wall time, peak resident memory of each process (``ru_maxrss`` from ``wait4``: the exact peak, no
sampling), its ratio to the model's bytes (bar: at most 35% for the disk run), whether the disk run's checkpoint is
tensor-for-tensor identical to the in-memory one, how far the 2-rank output is from the 1-process one, and the
2-process speedup. (The ranks sum their Hessians in another order than one process does; on random weights, where
2:4 choices are often near ties, the float32 rounding of that sum flips some of them, and the flips propagate to
later layers. One process with two calibration chunks instead of one differs from it in the same way. The tests
check the exact match on a tiny model; use ``--hessian-dtype float64`` where bit-equality matters.) On a 2-core machine the single process uses both cores for its BLAS and the two ranks one
each, so the speedup measures the split of the work, not more hardware.

    python -m benchmarks.studies.scale [--work DIR] [--out benchmarks/results] [--layers 20 --hidden 1536 --ffn 4096 --vocab 64000]

Writes ``<out>/scale.json``, ``<out>/scale.md`` and appends the raw output to ``<out>/scale.log``.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.protocol import RESULTS


def _make(argv: list[str]) -> None:
    """In a child process: the random model (once) and the calibration tokens."""
    import torch
    from safetensors.torch import save_file

    model_dir, calib = Path(argv[0]), Path(argv[1])
    layers, hidden, ffn, vocab, heads, nsamples, seqlen = map(int, argv[2:9])
    build_model(model_dir, layers, hidden, ffn, vocab, heads, print)
    g = torch.Generator().manual_seed(0)
    save_file({"input_ids": torch.randint(0, vocab, (nsamples, seqlen), generator=g)}, str(calib))


def build_model(folder: Path, layers: int, hidden: int, ffn: int, vocab: int, heads: int, log) -> int:
    """Save the random model once (seed 0); returns its bytes."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    if not (folder / "config.json").is_file():
        cfg = LlamaConfig(hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers, num_attention_heads=heads,
                          num_key_value_heads=heads, vocab_size=vocab, max_position_embeddings=4096,
                          tie_word_embeddings=False)
        torch.manual_seed(0)
        t0 = time.perf_counter()
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp, max_shard_size="1GB")
        del model
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
        log(f"built {folder} in {time.perf_counter() - t0:.1f} s")
    return sum(os.path.getsize(f) for f in glob.glob(str(folder / "*.safetensors")))


def run(cmd: list[str], log, env: dict | None = None) -> dict:
    log(f"$ {' '.join(cmd)}")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    out = proc.stdout.read()
    _, status, ru = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    log(out.rstrip())
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"failed: {' '.join(cmd)}")
    # ru_maxrss of a waited-for child: the largest peak among it and the descendants it waited for (under
    # torchrun: the larger rank, as each rank is its own process)
    return {"wall_s": round(wall, 1), "peak_rss_mb": round(ru.ru_maxrss / 1024, 1)}


def weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(glob.glob(str(folder / "model*.safetensors"))):
        out.update(load_file(f))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default=str(Path.home() / ".cache" / "sparsegpt-export" / "scale"))
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--layers", type=int, default=20)
    ap.add_argument("--hidden", type=int, default=1536)
    ap.add_argument("--ffn", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--vocab", type=int, default=64000)
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--keep", action="store_true", help="keep the outputs in --work")
    ap.add_argument("--name", default="scale", help="results file stem: <out>/<name>.json and .md (default scale)")
    args = ap.parse_args()
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    logf = (out / "scale.log").open("a")

    def log(msg: str) -> None:
        print(msg, flush=True)
        logf.write(msg + "\n")
        logf.flush()

    log(f"=== benchmarks/scale.py {time.strftime('%Y-%m-%d %H:%M:%S')} on {platform.node()} ({os.cpu_count()} cores)")
    model_dir = work / f"llama-{args.layers}x{args.hidden}x{args.ffn}"
    calib = work / f"calib-{args.nsamples}x{args.seqlen}.safetensors"
    # the model and the tokens are made by a child process: a child's ru_maxrss starts at the RSS of the process it
    # was forked from, so this one stays small (no torch) until the runs are done
    made = subprocess.run([sys.executable, "-m", "benchmarks.studies.scale", "--_make", str(model_dir), str(calib), str(args.layers),
                           str(args.hidden), str(args.ffn), str(args.vocab), str(args.heads), str(args.nsamples),
                           str(args.seqlen)], capture_output=True, text=True, cwd=RESULTS.parents[1])
    if made.returncode != 0:
        raise RuntimeError(f"building the model failed: {made.stderr[-2000:]}")
    if made.stdout.strip():
        log(made.stdout.strip())
    model_bytes = sum(os.path.getsize(f) for f in glob.glob(str(model_dir / "*.safetensors")))
    log(f"model: {model_dir} {model_bytes / 2**30:.3f} GiB of safetensors")
    common = ["compress", str(model_dir), "--dataset", str(calib), "--nsamples", str(args.nsamples), "--seqlen",
              str(args.seqlen), "--pattern", "2:4", "--bits", "4", "--group-size", "128", "--device", "cpu",
              "--no-progress", "--overwrite"]
    py = [sys.executable, "-m", "sparsegpt_export"]
    env1 = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    envn = {**env1, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // args.procs))}
    rows = {}
    # the disk run first, with its own choice of windows per block forward (streaming from disk it keeps a chunk's
    # activations about one block's size); the in-memory reference then runs with that same choice, since a
    # Hessian summed over other chunks differs in its float32 rounding
    rows["--offload disk"] = run(py + common + ["--offload", "disk", "--offload-dir", str(work / "stage"),
                                                "--out", str(work / "disk")], log, env1)
    batch = json.loads((work / "disk" / "sparsegpt_report.json").read_text())["calib_batch_size"]
    log(f"the disk run took {batch} windows per block forward; the in-memory run is given the same")
    rows["in memory (--offload cpu)"] = run(py + common + ["--offload", "cpu", "--calib-batch-size", str(batch),
                                                           "--out", str(work / "mem")], log, env1)
    two = f"--offload disk, {args.procs} processes"
    if args.procs > 1:
        rows[two] = run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.procs}", "-m",
             "sparsegpt_export"] + common + ["--offload", "disk", "--offload-dir", str(work / "stage"),
                                              "--out", str(work / "disk2")], log, envn)
    for r in rows.values():
        r["rss_over_model"] = round(r["peak_rss_mb"] * 2**20 / model_bytes, 4)
    import torch

    mem, disk = weights(work / "mem"), weights(work / "disk")
    disk2 = weights(work / "disk2") if args.procs > 1 else disk
    identical = sorted(mem) == sorted(disk) and all(torch.equal(mem[k], disk[k]) for k in mem)
    masks_equal = sorted(disk) == sorted(disk2) and all(torch.equal(disk[k] == 0, disk2[k] == 0) for k in disk)
    mask_flips = sum(int(((disk[k] == 0) != (disk2[k] == 0)).sum()) for k in disk if k in disk2)
    mask_frac = mask_flips / sum(disk[k].numel() for k in disk)
    worst = max(float((disk[k].double() - disk2[k].double()).norm() / disk[k].double().norm().clamp_min(1e-30))
                for k in disk)
    del mem, disk, disk2
    reports = {k: json.loads((work / k / "sparsegpt_report.json").read_text())
               for k in ("mem", "disk", "disk2")[:3 if args.procs > 1 else 2]}
    per_block = [sum(r["time_s"] for r in reports["disk"]["layers"] if r["layer"].startswith(f"model.layers.{i}."))
                 for i in range(args.layers)]
    results = {
        "model": {"layers": args.layers, "hidden": args.hidden, "ffn": args.ffn, "heads": args.heads,
                  "vocab": args.vocab, "dtype": "float32", "bytes": model_bytes,
                  "params": int(model_bytes // 4)},
        "calibration": {"nsamples": args.nsamples, "seqlen": args.seqlen, "tokens": "random, seed 0"},
        "config": "2:4 + 4-bit g128 symmetric",
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "runs": rows,
        "disk_checkpoint_identical_to_in_memory": identical,
        "two_rank_masks_identical": masks_equal,
        "two_rank_mask_entries_differing_fraction": mask_frac,
        "mean_layer_rel_error": {k: reports[k]["summary"]["mean_rel_error"] for k in reports},
        "two_rank_worst_rel_weight_diff": worst,
        "calib_batch_size": batch,
        "speedup_2_processes_over_1": round(rows["--offload disk"]["wall_s"] / rows[two]["wall_s"], 3) if two in rows else None,
        "disk_profile": reports["disk"]["profile"],
        "disk_compress_s": reports["disk"]["summary"]["wall_s"],
        "disk_layer_solve_s_per_block_median": sorted(per_block)[len(per_block) // 2],
        "disk_layers": [{k: r[k] for k in ("layer", "shape", "time_s")} for r in reports["disk"]["layers"]],
        "bar_rss_over_model_max": 0.35,
    }
    (out / f"{args.name}.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = [f"Random Llama {args.layers} x hidden {args.hidden} x ffn {args.ffn}, {model_bytes / 2**30:.2f} GiB float32; "
             f"calibration {args.nsamples} x {args.seqlen} random tokens, {batch} per block forward; 2:4 + 4-bit g128; "
             f"{results['machine']}", "",
             "| run | wall s | peak RSS MB | peak RSS / model bytes |", "|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['wall_s']} | {r['peak_rss_mb']} | {r['rss_over_model']:.3f} |")
    lines += ["", f"- disk checkpoint identical to the in-memory one (every tensor): {identical}"]
    if two in rows:
        lines += [f"- {args.procs}-rank output: masks identical {masks_equal} ({mask_frac:.2e} of the entries differ), worst "
              f"relative weight difference {worst:.3g}; mean layer relative error "
              + ", ".join(f"{k} {v:.5g}" for k, v in results["mean_layer_rel_error"].items()),
              f"- speedup of {args.procs} processes over 1 (--offload disk): {results['speedup_2_processes_over_1']}x"]
    lines += [f"- median solve time of a block (disk run): {results['disk_layer_solve_s_per_block_median']:.1f} s"]
    (out / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    log("\n".join(lines))
    if not args.keep:
        for k in ("mem", "disk", "disk2"):
            shutil.rmtree(work / k, ignore_errors=True)
    # the bars: the disk run's checkpoint equals the in-memory one, and its peak memory is at most 35% of the model
    return 0 if identical and rows["--offload disk"]["rss_over_model"] <= 0.35 else 1


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--_make":
        _make(sys.argv[2:])
        sys.exit(0)
    sys.exit(main())
