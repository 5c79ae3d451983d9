"""Shared pieces of ``python -m benchmarks run``: timing, device names, result files.

Every figure is a median over ``repeat`` runs after ``warmup`` runs, with its spread (min, max, IQR); on CUDA
each run is timed with CUDA events, elsewhere with ``time.perf_counter``. Speedups are ratios of medians
measured side by side in the same process. A figure that could not be taken is not invented: its entry says
``"skipped": "<reason>"`` instead.
"""
from __future__ import annotations

import json
import math
import os
import platform
import re
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def device_name(device: str) -> str:
    """A folder-safe name for the device: the GPU model, or the CPU model with its core count."""
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(torch.device(device))
    else:
        name = platform.processor() or platform.machine()
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
        name = f"cpu-{name}-{os.cpu_count()}c"
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-")


def timed(fn: Callable[[], Any], device: str, warmup: int = 3, repeat: int = 10) -> dict[str, float]:
    """Median and spread of ``fn()``'s time in milliseconds."""
    for _ in range(warmup):
        fn()
    times = []
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        for _ in range(repeat):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    q = statistics.quantiles(times, n=4) if len(times) >= 2 else [times[0]] * 3
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times),
            "iqr_ms": q[2] - q[0], "repeat": repeat}


def ratio(a: dict, b: dict) -> float:
    """``a``'s median time over ``b``'s: the speedup of ``b`` against ``a``."""
    return a["median_ms"] / b["median_ms"]


def rel_error(ref: torch.Tensor, out: torch.Tensor) -> float:
    return float((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30))


def environment(device: str) -> dict[str, Any]:
    env = {"device": device, "device_name": device_name(device), "torch": torch.__version__,
           "python": platform.python_version(), "threads": torch.get_num_threads(),
           "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    if device.startswith("cuda"):
        env["cuda"] = torch.version.cuda
        env["cusparselt"] = bool(torch.backends.cusparselt.is_available())
    return env


def write_results(suite: str, device: str, result: dict, table: list[str], out: Optional[Path] = None,
                  plot: Optional[Callable[[Path], None]] = None) -> Path:
    """``<out>/<device-name>/<suite>.json`` and ``.md`` (and ``.png`` when ``plot`` and matplotlib are there)."""
    folder = Path(out or RESULTS) / device_name(device)
    folder.mkdir(parents=True, exist_ok=True)
    check_measured(result)
    (folder / f"{suite}.json").write_text(json.dumps(result, indent=1) + "\n")
    (folder / f"{suite}.md").write_text("\n".join(table) + "\n")
    if plot is not None:
        try:
            import matplotlib

            matplotlib.use("Agg")
            plot(folder / f"{suite}.png")
        except ImportError:
            print(f"(no plot for {suite}: matplotlib is not installed; pip install '.[bench]')")
    return folder


def check_measured(obj: Any, path: str = "") -> None:
    """Every number is finite; a row without figures says why (``skipped``). Raises ValueError otherwise."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            check_measured(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            check_measured(v, f"{path}[{i}]")
    elif isinstance(obj, float) and not math.isfinite(obj):
        raise ValueError(f"benchmark result {path} is {obj}")
    elif obj is None and not path.endswith(("skipped", "note")):
        raise ValueError(f"benchmark result {path} is missing (None)")
