"""The package's layers import only downward (docs/design.md, "Layout")."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "declopt"

LAYERS: list[tuple[str, ...]] = [
    ("declopt.errors", "declopt.program", "declopt.compiling", "declopt.batched", "declopt.kkt"),
    ("declopt.linalg", "declopt.kkt.tolerances", "declopt.kkt.functions"),
    ("declopt.derivatives",),
    ("declopt.kkt.point",),
    ("declopt.kkt.newton", "declopt.implicit"),
    ("declopt.policies", "declopt.diagnostics", "declopt.inputs", "declopt.frontend"),
    ("declopt.backends",),
    ("declopt.layer",),
    ("declopt.penalties", "declopt.nn", "declopt.torch", "declopt.gradcheck"),
]


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _rank(module: str) -> int | None:
    """The layer of ``module``: its longest matching prefix decides (``declopt.kkt`` itself, a
    docstring-only package, sits at the bottom; its modules have layers of their own)."""
    best: tuple[int, int] | None = None
    for rank, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and (best is None or len(p) > best[0]):
                best = (len(p), rank)
    return None if best is None else best[1]


MODULES = sorted(p for p in PACKAGE.rglob("*.py") if _module(p) != "declopt")


def test_every_module_has_a_layer() -> None:
    assert [m for m in map(_module, MODULES) if _rank(m) is None] == []


@pytest.mark.parametrize("path", MODULES, ids=_module)
def test_module_imports_only_from_its_layer_or_below(path: Path) -> None:
    own = _rank(_module(path))
    imported = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("declopt"):
            imported.add(node.module)
        elif isinstance(node, ast.Import):
            imported.update(a.name for a in node.names if a.name.startswith("declopt"))
    upward = sorted(m for m in imported if (_rank(m) or 0) > own)
    assert upward == [], f"{_module(path)} imports from a layer above it: {upward}"
