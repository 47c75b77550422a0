"""The named statements of `sql/queries.sql`, and the few helpers that run them on sqlite3 directly.

The store runs nothing else on the claim -> heartbeat -> finish path; a name ending in
`.sqlite` or `.postgresql` is that dialect's variant of the plain name.
"""

from __future__ import annotations

import re
import sqlite3
from collections import namedtuple
from collections.abc import Iterator
from functools import lru_cache
from typing import Any

from sqlalchemy import exc

from hparray import resources


def _load_queries() -> dict[str, str]:
    queries: dict[str, str] = {}
    name = None
    for line in resources.sql().joinpath("queries.sql").read_text().splitlines():
        if match := re.match(r"--\s*name:\s*(\S+)", line):
            name = match.group(1)
            queries[name] = ""
        elif name and not line.lstrip().startswith("--"):
            queries[name] += line + "\n"
    return {key: value.strip().rstrip(";") for key, value in queries.items()}


QUERIES = _load_queries()


def statement(name: str, dialect: str) -> str:
    """The text of a named statement for `dialect`."""
    return QUERIES.get(f"{name}.{dialect}") or QUERIES[name]


class SqliteResult:
    """What the write path reads from a statement (first, one, scalar, rowcount, lastrowid, rows
    with attributes), fetched at once from a sqlite3 cursor so that the statement is finished."""

    def __init__(self, cursor: sqlite3.Cursor):
        names = tuple(column[0] for column in cursor.description or ())
        data = cursor.fetchall() if names else []
        self.rowcount = cursor.rowcount
        self.lastrowid = cursor.lastrowid
        row = row_type(names) if names else tuple
        self.rows = [row(*values) for values in data]

    def first(self) -> Any:
        return self.rows[0] if self.rows else None

    def one(self) -> Any:
        if len(self.rows) != 1:
            raise exc.NoResultFound("no row") if not self.rows else exc.MultipleResultsFound("several rows")
        return self.rows[0]

    def scalar(self) -> Any:
        return self.rows[0][0] if self.rows else None

    def scalar_one(self) -> Any:
        return self.one()[0]

    def __iter__(self) -> Iterator[Any]:
        return iter(self.rows)


@lru_cache(maxsize=256)
def row_type(names: tuple[str, ...]) -> Any:
    return namedtuple("Row", names, rename=True)


def split_sql(script: str) -> list[str]:
    """Statements of a migration file (no semicolons inside strings or bodies in our schema)."""
    body = "\n".join(line.split("--", 1)[0] for line in script.splitlines())
    return [statement.strip() for statement in body.split(";") if statement.strip()]
