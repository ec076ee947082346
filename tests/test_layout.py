"""The design card's data flow: spaces -> predictors -> search -> results; kernels feed predictors.

Checked on the source (every ``import``/``from`` statement, lazy ones inside functions
included):

* a package may import only the packages upstream of it;
* no two modules of the package import each other, directly or round a longer loop (a lazy
  import inside a function counts: it hides a cycle, it does not remove it; an import under
  ``if TYPE_CHECKING:`` never runs and does not count);
* no module imports another module's private (``_name``) functions, classes or caches.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: top-level modules every package may use
SHARED = {"errors", "files", "checks"}

#: package -> the dynas packages it may import (besides itself and the SHARED modules)
ALLOWED = {
    "spaces": set(),
    "predictors": {"spaces"},
    "kernels": {"spaces", "predictors"},  # kernels measure and feed predictors (calibration, the finetune proxy)
    "search": {"spaces", "predictors"},
    "results": {"spaces", "predictors", "search"},
}
_SKIP = {".venv", "tests", "benchmarks", "build", "docs", "dist"}


def _module_name(path: Path) -> str:
    parts = ["dynas", *path.relative_to(ROOT).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _package_modules() -> dict[str, Path]:
    return {
        _module_name(p): p
        for p in sorted(ROOT.rglob("*.py"))
        if not _SKIP & set(p.relative_to(ROOT).parts) and not p.name.startswith(".")
    }


def _type_checking_only(tree: ast.AST) -> set[int]:
    """ids of the nodes under ``if TYPE_CHECKING:`` (never run, so no import at run time)."""
    skip = set()
    for node in ast.walk(tree):
        test = getattr(node, "test", None)
        if isinstance(node, ast.If) and (
            getattr(test, "id", None) == "TYPE_CHECKING" or getattr(test, "attr", None) == "TYPE_CHECKING"
        ):
            skip |= {id(n) for child in node.body for n in ast.walk(child)}
    return skip


def _import_nodes(path: Path) -> list[ast.Import | ast.ImportFrom]:
    tree = ast.parse(path.read_text())
    skip = _type_checking_only(tree)
    return [
        n
        for n in ast.walk(tree)
        if id(n) not in skip
        and (isinstance(n, ast.Import) or (isinstance(n, ast.ImportFrom) and n.level == 0 and n.module))
    ]


def _imports(path: Path) -> set[str]:
    found = set()
    for node in _import_nodes(path):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
        for name in names:
            parts = name.split(".")
            if parts[0] == "dynas" and len(parts) > 1:
                found.add(parts[1])
    return found


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_packages_import_only_upstream(package):
    for path in sorted((ROOT / package).rglob("*.py")):
        bad = _imports(path) - ALLOWED[package] - {package} - SHARED
        assert not bad, (
            f"{package}/{path.name} imports dynas.{', dynas.'.join(sorted(bad))} (not upstream of {package})"
        )


def _module_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the package modules it imports (``from m import name`` counts m.name where that is
    a module, else m)."""
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        deps = set()
        for node in _import_nodes(path):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:  # ``from pkg import mod`` needs mod (pkg/__init__ runs for any import below it)
                subs = [f"{node.module}.{a.name}" for a in node.names]
                names = [n for n in subs if n in modules] + (
                    [node.module] if any(n not in modules for n in subs) else []
                )
            for name in names:
                while name and name not in modules:
                    name = name.rpartition(".")[0]
                if name and name != module:
                    deps.add(name)
        graph[module] = deps
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle():
    cycles = _cycles(_module_graph(_package_modules()))
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_no_module_imports_private_names_of_another():
    modules = _package_modules()
    bad = []
    for module, path in modules.items():
        for node in _import_nodes(path):
            if isinstance(node, ast.ImportFrom) and node.module.startswith("dynas") and node.module != module:
                bad += [
                    f"{module} imports {node.module}.{a.name}"
                    for a in node.names
                    if a.name.startswith("_") and not a.name.startswith("__")
                ]
    assert not bad, "; ".join(bad)
