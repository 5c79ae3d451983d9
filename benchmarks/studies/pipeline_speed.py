"""The README's default compress (SmolLM2-135M, 2:4 + 4-bit g128 sym, fixed C4 tokens) with an older checkout of
this project and with a newer one, side by side in one run: wall time of the whole command, the time profile, the
checkpoint's bytes on disk after one block, and whether the two outputs are the same tensor for tensor.

    git worktree add /tmp/base <commit>          # the older code
    python -m benchmarks.studies.pipeline_speed --base /tmp/base [--new /tmp/new] [--rounds 1] [--abba] [--extra ARGS]

Each checkout runs in its own process from a folder laid out as pip installs it (``converters/`` and
``integrations/`` inside the package, by symbolic links), on ``PYTHONPATH``, from a neutral working folder;
without ``--new`` this project runs as installed. Rounds alternate (base, new, base, new, ...) so that a change in
the machine's speed falls on both alike (with ``--abba`` every second round runs new first: the second run of a pair
may be the slower one); ``uptime`` is logged before and after.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
from pathlib import Path

from benchmarks.protocol import RESULTS, compress_cmd, perplexities, report_of, run_process, same_tensors


def installed_layout(checkout: Path, where: Path) -> Path:
    """``where/sparsegpt_export`` laid out as pip installs a checkout (its files, and ``converters`` and
    ``integrations`` inside), by symbolic links; returns ``where``."""
    pkg = where / "sparsegpt_export"
    shutil.rmtree(where, ignore_errors=True)
    pkg.mkdir(parents=True)
    for f in (checkout / "sparsegpt_export").iterdir():
        (pkg / f.name).symlink_to(f.resolve())
    for sub in ("converters", "integrations"):
        if not (pkg / sub).exists():
            (pkg / sub).symlink_to((checkout / sub).resolve())
    return where


def _env(base: Path | None, crash_after: int | None = None) -> dict:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    if base is not None:
        env["PYTHONPATH"] = str(base)
    if crash_after is not None:
        env["SPARSEGPT_EXPORT_CRASH_AFTER_BLOCK"] = str(crash_after)
    return env


def checkpoint_bytes(base: Path | None, work: Path, name: str) -> dict:
    """Run until the checkpoint after block 0 (the run exits there, as killed) and measure that checkpoint."""
    out = work / f"ckpt-{name}"
    r = run_process(compress_cmd(out), env=_env(base, crash_after=0), cwd=work)
    ckpt = work / f".{out.name}.sparsegpt-checkpoint"
    files = {f.name: f.stat().st_size for f in sorted(ckpt.glob("*")) if f.is_file()}
    shutil.rmtree(ckpt, ignore_errors=True)
    return {"rc": r["rc"], "files": files, "total": sum(files.values())}


def _uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True, type=Path, help="checkout of the older code")
    ap.add_argument("--new", type=Path, default=None, help="checkout of the newer code (default: as installed)")
    ap.add_argument("--extra", default="", help="more compress arguments for both, e.g. '--calib-batch-size 128'")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--abba", action="store_true", help="every second round runs new first (base, new, new, base, ...), "
                                                        "so that a run's place in a pair weighs on both alike")
    ap.add_argument("--work", type=Path, default=Path("/tmp/pipeline_speed"))
    ap.add_argument("--out", type=Path, default=RESULTS / "pipeline_speed")
    ap.add_argument("--ppl", action="store_true", help="also WikiText-2 / C4 perplexity of both outputs")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    paths = {"base": installed_layout(args.base, args.work / "site-base"),
             "new": installed_layout(args.new, args.work / "site-new") if args.new else None}
    extra = args.extra.split()
    log = [f"base {args.base}, new {args.new or 'installed'}; extra {extra}; uptime before: {_uptime()}"]
    runs: dict[str, list] = {"base": [], "new": []}
    for r in range(args.rounds):
        for name, base in (list(paths.items())[::-1] if args.abba and r % 2 else paths.items()):
            out = args.work / f"out-{name}"
            res = run_process(compress_cmd(out, *extra), env=_env(base), cwd=args.work)
            log.append(f"$ {'PYTHONPATH=' + str(base) + ' ' if base else ''}{' '.join(compress_cmd(out, *extra)[1:])}\n"
                       f"{res['output'].rstrip()}\n-> rc {res['rc']}, wall {res['wall_s']} s, peak RSS {res['peak_rss_mb']} MB")
            if res["rc"]:
                raise SystemExit(f"{name} failed:\n{res['output'][-3000:]}")
            rep = report_of(out)
            runs[name].append({"round": r + 1, **{k: res[k] for k in ("wall_s", "peak_rss_mb", "user_s", "sys_s",
                                                                        "minor_faults")},
                               "profile": rep["profile"], "compress_s": rep["summary"]["wall_s"],
                               "mean_rel_error": rep["summary"]["mean_rel_error"]})
            print(name, runs[name][-1], flush=True)
    result = {"rounds": args.rounds, "abba": args.abba, "runs": runs,
              "round_ratios": [round(n["wall_s"] / b["wall_s"], 4) for b, n in zip(runs["base"], runs["new"])],
              "median_wall_s": {k: statistics.median(x["wall_s"] for x in v) for k, v in runs.items()},
              "outputs": same_tensors(args.work / "out-base", args.work / "out-new"),
              "checkpoint_after_block0": {k: checkpoint_bytes(v, args.work, k) for k, v in paths.items()},
              "extra": extra}
    log.append(f"uptime after: {_uptime()}")
    result["new_vs_base_wall"] = round(result["median_wall_s"]["new"] / result["median_wall_s"]["base"], 4)
    if args.ppl:
        result["ppl"] = {k: perplexities(args.work / f"out-{k}") for k in ("base", "new")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Path(str(args.out) + ".json").write_text(json.dumps(result, indent=2) + "\n")
    Path(str(args.out) + ".log").write_text("\n\n".join(log) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
