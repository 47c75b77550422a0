"""The layers stay layers (docs/architecture.md): the CLI holds no SQL and no statistics, the worker
no SQL, the store imports nothing above it, and no module grows past about 500 lines."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "hparray"
MODULES = sorted(path for path in PACKAGE.rglob("*.py") if "weights" not in path.parts)
SQL = re.compile(r"\b(SELECT|INSERT INTO|UPDATE \w+ SET|DELETE FROM)\b")
# What may sit below the store: nothing of the core, the CLI, Slurm or the runners.
STORE_MAY_IMPORT = ("hparray.store", "hparray.errors", "hparray.tasks", "hparray.environment", "hparray.resources")
LIMIT_LINES = 520


def imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def strings(path: Path) -> list[str]:
    return [node.value for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Constant) and isinstance(node.value, str)]


def package(name: str) -> list[Path]:
    return [path for path in MODULES if path.relative_to(PACKAGE).parts[0] == name]


@pytest.mark.parametrize("path", package("cli"), ids=lambda p: p.name)
def test_the_cli_holds_no_sql_and_no_statistics(path: Path) -> None:
    found = imports(path)
    assert not {"sqlalchemy", "sqlite3", "numpy", "scipy"} & {name.split(".")[0] for name in found}, found
    assert not any(name.startswith("hparray.report.stats") for name in found)
    assert not [text for text in strings(path) if SQL.search(text)]


@pytest.mark.parametrize("path", package("worker"), ids=lambda p: p.name)
def test_the_worker_holds_no_sql(path: Path) -> None:
    assert not {"sqlalchemy", "sqlite3"} & {name.split(".")[0] for name in imports(path)}
    assert not [text for text in strings(path) if SQL.search(text)]


@pytest.mark.parametrize("path", package("store"), ids=lambda p: p.name)
def test_the_store_imports_nothing_above_it(path: Path) -> None:
    above = [name for name in imports(path) if name.startswith("hparray") and not name.startswith(STORE_MAY_IMPORT)
             and name != "hparray"]
    assert above == [], f"{path.name} imports {above}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_is_much_over_500_lines(path: Path) -> None:
    lines = len(path.read_text().splitlines())
    assert lines <= LIMIT_LINES, f"{path.relative_to(PACKAGE)} has {lines} lines: split it where its parts differ"
