"""Where the database is: `--db`, `HPARRAY_DB` or `./results.db`, and its URL fit to show."""

from __future__ import annotations

import os
from pathlib import Path

from sqlalchemy import exc
from sqlalchemy.engine import make_url

DEFAULT_DB = "results.db"


def resolve_url(db: str | None) -> str:
    """`--db` / `HPARRAY_DB` / `./results.db`; a bare path means an SQLite file."""
    db = db or os.environ.get("HPARRAY_DB") or DEFAULT_DB
    if "://" not in db:
        return f"sqlite:///{Path(db).expanduser().resolve()}"
    if db.startswith("postgresql://") or db.startswith("postgres://"):
        # SQLAlchemy's default PostgreSQL driver is psycopg2; hparray ships psycopg 3.
        db = "postgresql+psycopg://" + db.split("://", 1)[1]
    return db


def redact_url(url: str) -> str:
    """The URL without its password, fit for a terminal or a JSON file."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except exc.ArgumentError:
        return url
