"""The package layers stay one-way: every metis_cli import (module level or inside a function)
points down the order below, and no source file grows past the size a reader can hold."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "metis_cli"
LAYERS = [
    ["cli"], ["stages"], ["curate", "evaluation"], ["tui"], ["train"], ["agent"], ["model"],
    ["rewards"], ["data"], ["algo"], ["telemetry"], ["recipe"], ["files", "host"], ["errors"],
]
"""Top to bottom; packages on one line may not import each other. `__main__` and the package
root sit above everything."""
RANK = {name: depth for depth, names in enumerate(LAYERS) for name in names}
MAX_LINES = 420


def _imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("metis_cli."):
            yield node.module.split(".")[1], node.lineno
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("metis_cli."):
                    yield alias.name.split(".")[1], node.lineno


def _package(path: Path) -> str:
    parts = path.relative_to(PACKAGE).parts
    return parts[0] if len(parts) > 1 else path.stem


def test_every_package_has_a_layer():
    packages = {_package(p) for p in PACKAGE.rglob("*.py")} - {"__init__", "__main__", "recipes"}
    assert packages <= set(RANK), f"packages without a layer: {sorted(packages - set(RANK))}"


def test_imports_point_down():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        source = _package(path)
        if source not in RANK:
            continue
        for target, line in _imports(path):
            if target != source and target in RANK and RANK[target] <= RANK[source]:
                upward.append(f"{path.relative_to(PACKAGE.parent)}:{line} {source} -> {target}")
    assert not upward, "imports that point up or sideways:\n" + "\n".join(upward)


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_files_stay_short(path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(PACKAGE.parent)} has {lines} lines; split it by idea"
