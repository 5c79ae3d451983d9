"""What every benchmark and study shares: the paths of the real data, one compression in its own process (wall
time and that process's peak memory), and perplexity with the SparseGPT/GPTQ protocol on WikiText-2 and C4.

Run the studies from the project root as modules (``python -m benchmarks.studies.NAME``) after
``pip install -e .``; nothing here edits ``sys.path``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
CALIB = DATA / "calib-smollm2-c4-128x512.safetensors"
WIKI = DATA / "wikitext2-raw-test.txt"
C4 = DATA / "c4-validation-2k.parquet"
RESULTS = ROOT / "benchmarks" / "results"
# the README's default command: SmolLM2-135M, 2:4 + 4-bit g128 sym, the fixed 128 x 512 C4 calibration tokens
DEFAULT_COMPRESS = ["smollm2-135m", "--pattern", "2:4", "--bits", "4", "--group-size", "128", "--dataset", str(CALIB),
                    "--nsamples", "128", "--seqlen", "512"]


def run_process(cmd: list[str], log_path: Optional[Path] = None, env: Optional[dict] = None,
                cwd: Optional[Path] = None) -> dict:
    """Run ``cmd`` to completion: ``{"rc", "wall_s", "peak_rss_mb", "user_s", "sys_s", "minor_faults", "output"}``
    (the child's own peak RSS, CPU times and page faults served without I/O)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=cwd)
    output = proc.stdout.read()
    _, status, rusage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if log_path is not None:
        log_path.write_text(output)
    return {"rc": os.waitstatus_to_exitcode(status), "wall_s": round(wall, 2),
            "peak_rss_mb": round(rusage.ru_maxrss / 1024, 1), "user_s": round(rusage.ru_utime, 2),
            "sys_s": round(rusage.ru_stime, 2), "minor_faults": rusage.ru_minflt, "output": output}


def compress_cmd(out: Path, *extra: str, python: str = sys.executable) -> list[str]:
    """``python -m sparsegpt_export compress`` with the README's default arguments, on the CPU, into ``out``."""
    return [python, "-m", "sparsegpt_export", "compress", *DEFAULT_COMPRESS, "--device", "cpu", "--out", str(out),
            "--overwrite", "--no-progress", *extra]


def report_of(out: Path) -> dict:
    return json.loads((out / "sparsegpt_report.json").read_text())


def perplexities(model_dir: str | Path, windows: int = 16, seqlen: int = 2048) -> dict:
    """WikiText-2 (raw test) and C4 (validation rows 1000:2000) perplexity of a checkpoint folder, float32 CPU."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sparsegpt_export.calibration import load_eval_text
    from sparsegpt_export.evaluation import perplexity

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    wiki = perplexity(model, tok, load_eval_text(str(WIKI)), seqlen=seqlen, windows=windows)
    c4 = perplexity(model, tok, load_eval_text(str(C4), (1000, 2000)), seqlen=seqlen, windows=windows)
    return {"wikitext2_ppl": round(wiki["ppl"], 4), "c4_ppl": round(c4["ppl"], 4), "windows": wiki["windows"],
            "seqlen": seqlen}


def same_tensors(a: Path, b: Path) -> dict:
    """Compare two checkpoint folders tensor by tensor: ``{"identical", "tensors", "differ": [names]}``."""
    from safetensors.torch import load_file

    def load(folder: Path) -> dict:
        out = {}
        for f in sorted(folder.glob("*.safetensors")):
            out.update({f"{f.name}:{k}": v for k, v in load_file(str(f)).items()})
        return out

    ta, tb = load(a), load(b)
    import torch

    differ = sorted(k for k in ta.keys() | tb.keys() if k not in ta or k not in tb or not torch.equal(ta[k], tb[k]))
    return {"identical": not differ, "tensors": len(ta), "differ": differ[:20]}


def mask_agreement(a: Path, b: Path, prefix: str = "model.layers.") -> float:
    """Share of the decoder weights whose zero/nonzero status is the same in two compress outputs."""
    from safetensors.torch import load_file

    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    same = total = 0
    for k, v in wa.items():
        if k.startswith(prefix) and k.endswith(".weight") and v.dim() == 2:
            same += int(((v == 0) == (wb[k] == 0)).sum())
            total += v.numel()
    return same / total if total else 1.0


def rows_parser(description: str, rows: dict):
    """The arguments every per-row SmolLM2 study takes: ``--rows`` (default all), ``--out``, ``--windows``,
    ``--seqlen``."""
    import argparse

    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--rows", default=",".join(rows))
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=2048)
    return ap


def data_missing() -> Optional[Path]:
    """The first of the calibration and evaluation files that is not there (None when all are)."""
    return next((f for f in (CALIB, WIKI, C4) if not f.is_file()), None)
