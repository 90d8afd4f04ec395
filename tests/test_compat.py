"""Every private Dagster name the package relies on still exists (dagster_runway/_compat.py).

A Dagster upgrade that moves one fails here, with the name and the module, rather than somewhere deep
in a sensor at run time.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

COMPAT = Path(__file__).resolve().parents[1] / "dagster_runway" / "_compat.py"
PACKAGE = COMPAT.parent


def _private_imports(path: Path) -> list[tuple[str, str]]:
    tree = ast.parse(path.read_text())
    return [
        (node.module, alias.name)
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dagster._")
        for alias in node.names
    ]


@pytest.mark.parametrize("module, name", _private_imports(COMPAT), ids=lambda v: str(v))
def test_each_private_dagster_name_still_exists(module: str, name: str) -> None:
    try:
        found = importlib.import_module(module)
    except ImportError as exc:
        pytest.fail(
            f"Dagster no longer has the module {module} (for {name}); update dagster_runway/_compat.py: {exc}"
        )
    assert hasattr(found, name), f"Dagster's {module} no longer has {name}; update dagster_runway/_compat.py"


def test_no_module_but_compat_imports_from_dagster_private_modules() -> None:
    offenders = {
        str(path.relative_to(PACKAGE)): imports
        for path in PACKAGE.rglob("*.py")
        if path != COMPAT and (imports := _private_imports(path))
    }
    assert offenders == {}, f"import these through dagster_runway/_compat.py: {offenders}"
