"""The shape of the code that issue #25 asked for, checked statically (fast, no imports): no import cycle among the
package's modules (imports inside functions count too), no ``sys.path`` / ``__path__`` edits anywhere, and the pipeline and the
solver made of small functions."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# where each top-level folder is installed (pyproject's package-dir)
PACKAGES = {"sparsegpt_export": ROOT / "sparsegpt_export", "sparsegpt_export.converters": ROOT / "converters",
            "sparsegpt_export.integrations": ROOT / "integrations"}
MAX_LINES = 60


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg, folder in PACKAGES.items():
        for f in folder.rglob("*.py"):
            rel = f.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            if "optimum_register" in parts:
                continue
            mods[".".join([pkg, *parts])] = f
    return mods


def _imports(name: str, f: Path, known: set[str]) -> set[str]:
    """The package modules ``name`` imports, anywhere in it (inside functions too: a cycle hidden there is one)."""
    tree = ast.parse(f.read_text())
    is_pkg = f.name == "__init__.py"
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:
                parent = base[:len(base) - node.level + 1]
                mod = ".".join(parent + ([mod] if mod else []))
            for alias in node.names:
                full = f"{mod}.{alias.name}"
                out.add(full if full in known else mod)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return {m for m in out if m in known and m != name}


def test_no_import_cycle():
    mods = _modules()
    graph = {n: _imports(n, f, set(mods)) for n, f in mods.items()}
    # a package's __init__ importing its own submodules is no cycle of the kind that breaks an import
    state: dict[str, int] = {}

    def visit(n: str, stack: list[str]) -> None:
        state[n] = 1
        for m in graph[n]:
            if n.startswith(m + ".") or m.startswith(n + "."):
                continue
            if state.get(m) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(m):] + [m]))
            if m not in state:
                visit(m, stack + [m])
        state[n] = 2

    for n in graph:
        if n not in state:
            visit(n, [n])


def test_no_path_edits():
    bad = []
    for folder in ("sparsegpt_export", "converters", "integrations", "tests", "benchmarks"):
        for f in (ROOT / folder).rglob("*.py"):
            text = f.read_text()
            if "sys.path.insert" in text or "sys.path.append" in text or "__path__.append" in text:
                if f.name != "test_layout.py":
                    bad.append(str(f.relative_to(ROOT)))
    assert not bad, bad


def test_the_package_is_small_functions():
    """No function over ~60 lines anywhere in the package (the pipeline, the solver, the converters, the
    integrations)."""
    long = []
    for folder in PACKAGES.values():
        for f in folder.rglob("*.py"):
            for node in ast.walk(ast.parse(f.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    n = node.end_lineno - node.lineno + 1
                    if n > MAX_LINES:
                        long.append(f"{f.relative_to(ROOT)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, long


def test_every_subpackage_is_in_the_wheel():
    """pyproject lists its packages by hand (package-dir maps converters/ and integrations/): a subpackage missing
    from that list is missing from a non-editable install (the pipeline and solver once were)."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    for pkg, folder in PACKAGES.items():
        for init in folder.rglob("__init__.py"):
            rel = init.parent.relative_to(folder).parts
            if "optimum_register" in rel or "__pycache__" in rel:
                continue
            name = ".".join([pkg, *rel])
            assert name in listed, f"{name} ({init.parent}) is not in pyproject's [tool.setuptools] packages"
