"""Issue #28: the same model from one process, from one process in chunks (``--calib-batch-size 32``) and from
``torchrun`` with 2 processes (gloo, one thread each), side by side in one run: share of identical masks, bit
identity of the outputs, WikiText-2 perplexity, wall time of each, and where each rank's time went.

    python -m benchmarks.studies.split_invariance [--skip-ppl] [--out benchmarks/results/split_invariance]

All on the README's default compress (SmolLM2-135M, 2:4 + 4-bit g128 sym, the fixed 128 x 512 C4 tokens).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from benchmarks.protocol import (RESULTS, compress_cmd, mask_agreement, perplexities, report_of, run_process,
                                 same_tensors)

RUNS = {
    "one process": [],
    "one process, --calib-batch-size 32": ["--calib-batch-size", "32"],
    "torchrun, 2 processes": None,  # built in _cmd
}


def _cmd(name: str, out: Path) -> tuple[list[str], dict]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    if RUNS[name] is not None:
        return compress_cmd(out, *RUNS[name]), env
    base = compress_cmd(out)
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", *base[1:]], \
        {**env, "OMP_NUM_THREADS": "1"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/split_invariance"))
    ap.add_argument("--out", type=Path, default=RESULTS / "split_invariance")
    ap.add_argument("--skip-ppl", action="store_true")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    rows, log = {}, []
    for i, name in enumerate(RUNS):
        out = args.work / f"out{i}"
        cmd, env = _cmd(name, out)
        r = run_process(cmd, env=env)
        log.append(f"$ {' '.join(cmd)}\n{r['output'].rstrip()}\n-> rc {r['rc']}, wall {r['wall_s']} s")
        if r["rc"]:
            raise SystemExit(f"{name} failed:\n{r['output'][-3000:]}")
        rep = report_of(out)
        rows[name] = {"dir": str(out), "wall_s": r["wall_s"], "compress_s": rep["summary"]["wall_s"],
                      "mean_rel_error": rep["summary"]["mean_rel_error"], "profile": rep["profile"],
                      "profile_by_rank": rep.get("profile_by_rank"), "calib_batch_size": rep["calib_batch_size"],
                      "world_size": rep["world_size"]}
        print(name, {k: v for k, v in rows[name].items() if k != "profile_by_rank"}, flush=True)
    first = Path(rows["one process"]["dir"])
    for name, row in rows.items():
        row["masks_equal_to_one_process"] = mask_agreement(first, Path(row["dir"]))
        row["bit_identical_to_one_process"] = same_tensors(first, Path(row["dir"]))["identical"]
        if not args.skip_ppl:
            row.update(perplexities(row["dir"]))
    one = rows["one process"]["wall_s"]
    for row in rows.values():
        row["wall_vs_one_process"] = round(row["wall_s"] / one, 3)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Path(str(args.out) + ".json").write_text(json.dumps(rows, indent=2) + "\n")
    Path(str(args.out) + ".log").write_text("\n\n".join(log) + "\n")
    lines = ["| run | masks equal to one process | bit-identical | WikiText-2 ppl | mean layer rel. error | wall s | x one process |",
             "|---|---|---|---|---|---|---|"]
    for name, row in rows.items():
        lines.append(f"| {name} | {100 * row['masks_equal_to_one_process']:.3f}% | {row['bit_identical_to_one_process']} "
                     f"| {row.get('wikitext2_ppl', '-')} | {row['mean_rel_error']:.5f} | {row['wall_s']} | "
                     f"{row['wall_vs_one_process']} |")
    Path(str(args.out) + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
