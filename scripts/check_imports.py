"""The import graph of `src/grpokit`: no cycles between modules, none between packages, and no
private names imported across modules.

    python scripts/check_imports.py        # prints the problems; exit code 1 if there are any

Every import counts, at module level or inside a function (a lazy import hides a cycle, it does
not remove it). `from pkg import name` depends on the module `pkg.name` when that is a module,
else on `pkg` itself. A package's `__init__` re-exporting its own submodules is not a cycle with
them (Python imports a parent package before its child anyway); any other two-way dependency is.
Packages: each top-level unit of `grpokit` (a folder such as `core`, or a module such as
`config`) is one node; a cycle through several of them is a layering problem even when no two
modules import each other. Run by tests/unit/test_imports.py."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "src"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted((ROOT / "grpokit").rglob("*.py"))}


def _resolve(node: ast.ImportFrom, here: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = here.split(".") if is_package else here.split(".")[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports(name: str, path: Path, known: set[str]) -> tuple[set[str], list[str]]:
    """(grpokit modules `name` imports, private names it takes from other modules)."""
    tree = ast.parse(path.read_text(), str(path))
    deps: set[str] = set()
    private: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            deps |= {a.name for a in node.names if a.name in known}
        elif isinstance(node, ast.ImportFrom):
            src = _resolve(node, name, path.name == "__init__.py")
            if not (src == "grpokit" or src.startswith("grpokit.")):
                continue
            for a in node.names:
                sub = f"{src}.{a.name}"
                if sub in known:
                    deps.add(sub)
                else:
                    deps.add(src)
                    if a.name.startswith("_") and src != name:
                        private.append(f"{name} imports {a.name} from {src}")
    deps.discard(name)
    return {d for d in deps if d in known}, private


def _is_reexport(a: str, b: str) -> bool:
    """`a` is a package and `b` one of its own modules (or the other way round)."""
    return b.startswith(a + ".") or a.startswith(b + ".")


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), after dropping the edges
    between a package and its own submodules."""
    g = {a: {b for b in deps if not _is_reexport(a, b)} for a, deps in graph.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(g[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10_000)
    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def unit_of(module: str) -> str | None:
    """The top-level unit of a module (`grpokit.core.loop` -> `core`); None for the package root."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def package_graph(graph: dict[str, set[str]]) -> tuple[dict[str, set[str]], dict[tuple[str, str], list[str]]]:
    """The graph between top-level units, and the module imports behind each of its edges."""
    units: dict[str, set[str]] = {}
    why: dict[tuple[str, str], list[str]] = {}
    for a, deps in graph.items():
        ua = unit_of(a)
        if ua is not None:
            units.setdefault(ua, set())
        for b in deps:
            ub = unit_of(b)
            if ua is None or ub is None or ua == ub:
                continue
            units[ua].add(ub)
            units.setdefault(ub, set())
            why.setdefault((ua, ub), []).append(f"{a} -> {b}")
    return units, why


def problems() -> list[str]:
    mods = modules()
    known = set(mods)
    graph, private = {}, []
    for name, path in mods.items():
        graph[name], priv = imports(name, path, known)
        private += priv
    found = [f"import cycle: {' <-> '.join(c)}" for c in find_cycles(graph)]
    units, why = package_graph(graph)
    for cycle in find_cycles(units):
        edges = [f"{a} -> {b} ({why[(a, b)][0]})" for a in cycle for b in cycle if (a, b) in why]
        found.append(f"package cycle: {' <-> '.join(cycle)}: " + "; ".join(edges))
    return found + [f"private name across modules: {p}" for p in private]


if __name__ == "__main__":
    found = problems()
    print("\n".join(found) if found else "no import cycles, no private names across modules")
    sys.exit(1 if found else 0)
