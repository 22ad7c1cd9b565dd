"""The package's import structure: no cycles, imports only downward, no private names across modules."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "eigenkv"

# Floors, bottom up: a module may import modules of its own floor or below, never above.
FLOORS = [
    # numerics and kernels: know nothing of caches, models or experiments
    ("eigenkv.env", "eigenkv.io", "eigenkv.checks", "eigenkv.plots", "eigenkv.kernels",
     "eigenkv.quant.config", "eigenkv.quant.reference", "eigenkv.quant.packing"),
    # text, models (and where their layers compute), byte accounting
    ("eigenkv.data", "eigenkv.models", "eigenkv.memory", "eigenkv.devices"),
    # the quantized cache, the attention routing into Hugging Face models, decoding with a captured step
    ("eigenkv.quant", "eigenkv.graphs"),
    # the low-rank method
    ("eigenkv.compress",),
    # the recipe and its pipeline
    ("eigenkv.recipe", "eigenkv.pipeline", "eigenkv.finetune"),
    # evaluation and the command line
    ("eigenkv.eval",),
    ("eigenkv.cli", "eigenkv.__main__", "eigenkv"),
]  # fmt: skip


def modules(package: Path = PACKAGE) -> dict[str, Path]:
    found = {}
    for path in package.rglob("*.py"):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def imports(name: str, path: Path, known: dict) -> list[tuple[str, list[str]]]:
    """``(imported module, names)`` of every import in ``path`` (function-local ones too)."""
    out = []
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                here = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(here + ([base] if base else []))
            names = [a.name for a in node.names]
            submodules = [f"{base}.{n}" for n in names if f"{base}.{n}" in known]
            out += [(m, []) for m in submodules] + [(base, [n for n in names if f"{base}.{n}" not in known])]
    resolved = []
    for target, names in out:
        while target and target not in known:
            target = target.rpartition(".")[0]
        if target.startswith("eigenkv") and target != name:
            resolved.append((target, names))
    return resolved


def floor(name: str) -> int:
    best = None
    for level, prefixes in enumerate(FLOORS):
        for prefix in prefixes:
            inside = name == prefix or name.startswith(prefix + ".")
            if inside and (best is None or len(prefix) > best[1]):
                best = (level, len(prefix))
    assert best is not None, f"{name} is on no floor: add it to FLOORS"
    return best[0]


def graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    known = modules(package)
    return {
        name: {t for t, _ in imports(name, path, known) if not name.startswith(t + ".")} for name, path in known.items()
    }


def cycles(package: Path = PACKAGE) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    edges = graph(package)
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def upward(package: Path = PACKAGE) -> list[str]:
    return [
        f"{m} (floor {floor(m)}) imports {t} (floor {floor(t)})"
        for m, targets in graph(package).items()
        for t in targets
        if floor(t) > floor(m) and m != "eigenkv"
    ]


def private(package: Path = PACKAGE) -> list[str]:
    known = modules(package)
    return [
        f"{name} imports {target}.{n}"
        for name, path in known.items()
        for target, names in imports(name, path, known)
        for n in names
        if n.startswith("_") and not n.endswith("__")
    ]


def test_no_import_cycles():
    assert not cycles(), f"import cycles: {cycles()}"


def test_imports_only_run_downward():
    assert not upward(), "\n".join(upward())


def test_no_private_names_cross_modules():
    assert not private()


def test_the_checks_catch_a_broken_package(tmp_path):
    """A synthetic package with a cycle, an upward import and a private name is caught by each check."""
    fake = tmp_path / "eigenkv"
    (fake / "quant").mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "quant" / "__init__.py").write_text("")
    (fake / "quant" / "config.py").write_text("from eigenkv.quant.cache import X\n")
    (fake / "quant" / "cache.py").write_text("import eigenkv.quant.config\nfrom eigenkv.quant.config import _y\n")
    assert cycles(fake) == [["eigenkv.quant.cache", "eigenkv.quant.config"]]
    assert upward(fake) == ["eigenkv.quant.config (floor 0) imports eigenkv.quant.cache (floor 2)"]
    assert private(fake) == ["eigenkv.quant.cache imports eigenkv.quant.config._y"]
