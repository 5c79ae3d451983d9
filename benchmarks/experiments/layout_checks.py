"""Issue #25's checks anyone can run, in one command: ``python -m compileall`` over the package's folders, every
package module imported alone in a fresh interpreter (no import cycle, nothing missing; a ``__main__`` module
through ``python -m PKG --help``), and the longest function
of the package. Run from the project root after ``pip install -e .``:

    python -m benchmarks.experiments.layout_checks
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = {"sparsegpt_export": ROOT / "sparsegpt_export", "sparsegpt_export.converters": ROOT / "converters",
           "sparsegpt_export.integrations": ROOT / "integrations"}


def modules() -> list[str]:
    out = []
    for pkg, folder in FOLDERS.items():
        for f in sorted(folder.rglob("*.py")):
            parts = [p for p in f.relative_to(folder).with_suffix("").parts if p != "__init__"]
            out.append(".".join([pkg, *parts]))
    return out


def longest() -> tuple[int, str]:
    best = (0, "")
    for folder in FOLDERS.values():
        for f in folder.rglob("*.py"):
            for node in ast.walk(ast.parse(f.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    n = node.end_lineno - node.lineno + 1
                    best = max(best, (n, f"{f.relative_to(ROOT)}:{node.lineno} {node.name}"))
    return best


def main() -> int:
    rc = subprocess.run([sys.executable, "-m", "compileall", "-q", *map(str, FOLDERS.values())]).returncode
    print(f"python -m compileall -q sparsegpt_export converters integrations: exit {rc}")
    failed = []
    mods = modules()
    for m in mods:  # a __main__ module runs its command when imported: run it with --help instead
        cmd = ["-m", m.rsplit(".", 1)[0], "--help"] if m.endswith(".__main__") else ["-c", f"import {m}"]
        r = subprocess.run([sys.executable, *cmd], capture_output=True, text=True)
        if r.returncode:
            failed.append(f"{m}: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}")
    print(f"modules imported alone (__main__: `python -m PKG --help`), each in a fresh interpreter: {len(mods) - len(failed)} of {len(mods)} ok")
    for line in failed:
        print("  failed:", line)
    n, where = longest()
    print(f"longest function: {n} lines ({where})")
    return 1 if rc or failed else 0


if __name__ == "__main__":
    sys.exit(main())
