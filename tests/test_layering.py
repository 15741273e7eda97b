"""The one-way flow of imports: search_spaces <- supernet <- nas4dyn, with nas4dyn.errors the only exception."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# What each lower layer may import from the packages above it.
ALLOWED_FROM_ABOVE = {"nas4dyn.errors"}
HIGHER = {"search_spaces": ("supernet", "nas4dyn"), "supernet": ("nas4dyn",)}


def imported_modules(path: Path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.lineno, node.module


@pytest.mark.parametrize("package", sorted(HIGHER))
def test_lower_layers_do_not_import_higher_ones(package):
    offending = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for lineno, module in imported_modules(path):
            top = module.split(".")[0]
            if top in HIGHER[package] and module not in ALLOWED_FROM_ABOVE:
                offending.append(f"{path.relative_to(ROOT)}:{lineno} imports {module}")
    assert not offending, "\n".join(offending)
