"""The design card's data flow: spaces -> predictors -> search -> results; kernels feed predictors.

Checked on the source (every ``import``/``from`` statement, lazy ones inside functions
included): a package may import only the packages upstream of it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: package -> the dynas packages it may import (besides itself and the top-level errors/files/checks modules)
ALLOWED = {
    "spaces": set(),
    "predictors": {"spaces"},
    "kernels": {"spaces", "predictors"},  # kernels measure and feed predictors (calibration, the finetune proxy)
    "search": {"spaces", "predictors"},
    "results": {"spaces", "predictors", "search"},
}


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
        for name in names:
            parts = name.split(".")
            if parts[0] == "dynas" and len(parts) > 1:
                found.add(parts[1])
    return found


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_packages_import_only_upstream(package):
    for path in sorted((ROOT / package).glob("*.py")):
        bad = _imports(path) - ALLOWED[package] - {package, "errors", "files", "checks"}
        assert not bad, f"{package}/{path.name} imports dynas.{', dynas.'.join(sorted(bad))} (not upstream of {package})"
