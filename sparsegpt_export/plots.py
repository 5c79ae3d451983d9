"""``sparsegpt-export plot-sparsity DIR``: each compressed matrix's sparsity (and sensitivity score) as a PNG."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional


def plot_sparsity(model_dir: str | Path, out: Optional[str | Path] = None) -> Path:
    """Draw the per-layer sparsity of ``model_dir/sparsegpt_report.json`` (bars, in layer order) with the
    allocation's score beside it when the run had one; writes ``out`` (default ``model_dir/sparsity.png``)."""
    from .io import REPORT_FILE

    model_dir = Path(model_dir)
    report_f = model_dir / REPORT_FILE
    if not report_f.is_file():
        raise FileNotFoundError(f"{report_f}: no {REPORT_FILE}; plot-sparsity takes the output folder of compress")
    try:
        report = json.loads(report_f.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{report_f}: not valid JSON ({e})") from None
    rows = [r for r in report.get("layers", []) if "sparsity" in r]
    if not rows:
        raise ValueError(f"{report_f}: no compressed layers to plot")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("plot-sparsity needs matplotlib: pip install 'sparsegpt-export[plot]'") from None
    out = Path(out) if out else model_dir / "sparsity.png"
    x = list(range(len(rows)))
    fig, ax = plt.subplots(figsize=(max(8, len(rows) * 0.12), 4.5))
    colors = {"dense": "tab:gray", "unstructured": "tab:blue"}
    ax.bar(x, [r["sparsity"] for r in rows], color=[colors.get(r["pattern"], "tab:green") for r in rows], width=0.85)
    ax.set_ylabel("sparsity (share of weights pruned)")
    ax.set_ylim(0, 1)
    ax.set_xlabel("linear layer, in model order")
    target = report.get("config", {}).get("sparsity")
    if target is not None:
        ax.axhline(target, color="black", lw=0.8, ls="--", label=f"target {target:g}")
    scores = [r.get("score") for r in rows]
    if any(s is not None for s in scores):
        ax2 = ax.twinx()
        ax2.plot(x, [s if s is not None else float("nan") for s in scores], "o", ms=2.5, color="tab:red",
                 label="sensitivity score")
        ax2.set_ylabel("score", color="tab:red")
        if all(s is None or s > 0 for s in scores):
            ax2.set_yscale("log")
    alloc = report.get("allocation") or {}
    title = (f"{report.get('model') or model_dir.name}: {report.get('config', {}).get('pattern')}"
             f", allocation {alloc.get('method', 'uniform')}"
             + (f" ({alloc['sensitivity']})" if alloc.get("sensitivity") else "")
             + f", average {report.get('summary', {}).get('weighted_sparsity', 0):.4f}")
    ax.set_title(title, fontsize=9)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    tmp = out.with_name(out.name + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(out)
    return out
