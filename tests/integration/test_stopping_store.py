"""Sequential stopping in the store (migration 0004), the same on SQLite and PostgreSQL: skipping a
config's pending rows in one transaction never touches its running or finished rows, no claim takes
a skipped row, counts and status show them, and resuming puts exactly them back to pending.
A database of the previous schema migrates to one equal to a fresh one and keeps its rows."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import inspect

from hparray.plan import Plan
from hparray.store import Store, migration_files
from hparray.store.queries import split_sql
from hparray.store.records import StopRecord
from hparray.store.stopping import resume_skipped, skip_pending, stops
from tests.conftest import Project
from tests.integration.test_store_contract import T0, apply, done, make_plan, one, rows


def _stop(config_hash: str) -> StopRecord:
    return StopRecord(config_hash=config_hash, search="lr", metric="psnr", videos=3, planned=6, looks=4,
                      p_value=0.002, window_p_value=None, boundary=0.0125, skipped=0, stopped_at=0.0)


@pytest.fixture
def lr_plan(make_project: Callable[..., Project]) -> Plan:
    """6 videos, lr 1e-6, 1e-5 (baseline), 1e-4: 6 un-fine-tuned rows, then 18 fine-tune rows."""
    return make_plan(make_project())


def _config(plan: Plan, name: str) -> str:
    return next(c.hash for c in plan.configs if name in c.names.values())


def test_skipping_takes_only_pending_rows_and_no_claim_takes_a_skipped_one(store: Store, lr_plan: Plan) -> None:
    apply(store, lr_plan)
    worse = _config(lr_plan, "lr_1e-4")
    claimed = [store.claim("w", T0) for _ in range(6)]  # the un-fine-tuned rows
    for task in claimed:
        assert task is not None and store.finish(task, done(), T0 + 1)
    first = [store.claim("w", T0 + 2) for _ in range(3)]  # video 1's three configs
    mine = [t for t in first if t is not None and t.config_hash == worse]
    assert len(mine) == 1
    assert store.finish(first[0], done(), T0 + 3)  # one done, the others still running
    before = {r.id: r for r in rows(store, "SELECT * FROM tasks WHERE config_hash = :h AND status != 'pending'",
                                    h=worse)}

    assert skip_pending(store, _stop(worse), T0 + 4) == 5
    assert skip_pending(store, _stop(worse), T0 + 5) == 0  # a second worker's look changes nothing
    statuses = {r.id: r.status for r in rows(store, "SELECT id, status FROM tasks WHERE config_hash = :h", h=worse)}
    assert sorted(statuses.values()) == ["running"] + ["skipped"] * 5
    assert {r.id: r for r in rows(store, "SELECT * FROM tasks WHERE id IN ({})".format(
        ",".join(map(str, before))))} == before  # the running row untouched
    assert store.finish(mine[0], done(), T0 + 6)  # and it still records its result
    assert first[1] is not None and store.finish(first[1], done(), T0 + 6)

    counts = store.task_counts()
    assert (counts.skipped, counts.total, counts.runnable) == (5, 24, 10)
    progress = {p.hash: p for p in store.config_progress()}
    assert (progress[worse].skipped, progress[worse].done, progress[worse].pending) == (5, 1, 0)
    claimed_now = []
    while (task := store.claim("w", T0 + 7)) is not None:
        claimed_now.append(task)
        store.finish(task, done(), T0 + 8)
    assert len(claimed_now) == 10 and all(t.config_hash != worse for t in claimed_now)
    assert store.task_counts().to_run == 0 and store.waiting_work() == 0
    assert store.remaining_estimate_s() == 0.0  # skipped rows are not left to run

    [record] = stops(store)
    assert (record.config_hash, record.videos, record.skipped, record.stopped_at) == (worse, 3, 5, T0 + 4)
    assert one(store, "SELECT COUNT(*) AS n FROM events WHERE kind = 'stopped'").n == 1


def test_resuming_puts_exactly_the_skipped_rows_back(store: Store, lr_plan: Plan) -> None:
    apply(store, lr_plan)
    worse = _config(lr_plan, "lr_1e-4")
    assert skip_pending(store, _stop(worse), T0) == 6
    assert resume_skipped(store, T0 + 1) == 6
    assert resume_skipped(store, T0 + 2) == 0
    assert store.task_counts().skipped == 0 and store.task_counts().pending == 24
    assert stops(store) == []
    assert one(store, "SELECT COUNT(*) AS n FROM events WHERE kind = 'resumed'").n == 1


def test_a_database_of_the_previous_schema_migrates_to_the_fresh_one(tmp_path: Path) -> None:
    """A sweep planned before 0004 (rows pending, running and done): migrated in place."""
    old = tmp_path / "v3.db"
    before = [f for f in migration_files() if int(f.name[:4]) < 4]
    with sqlite3.connect(old) as conn:
        conn.execute("CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL, "
                     "applied_at DOUBLE PRECISION NOT NULL)")
        for file in before:
            for statement in split_sql(file.read_text().replace("{{SERIAL_PK}}", "INTEGER PRIMARY KEY")):
                conn.execute(statement)
            conn.execute("INSERT INTO schema_migrations VALUES (?, ?, 0)", (int(file.name[:4]), file.name[:-4]))
        conn.execute("INSERT INTO configs VALUES ('c', 'finetune', 1e-4, 4, 2, '{}', 0)")
        conn.execute("INSERT INTO videos VALUES ('v', '/v.npy', 'pan', NULL, 1)")
        for status in ("pending", "running", "done"):
            conn.execute("INSERT INTO tasks (config_hash, video, kind, max_attempts, estimate_s, created_at, status) "
                         "VALUES ('c', ?, 'finetune', 3, 1.0, 0, ?)", (status, status))
    conn.close()
    migrated, fresh = Store.open(str(old)), Store.open(str(tmp_path / "fresh.db"))
    try:
        def schema(store: Store) -> dict[str, Any]:
            tables = sorted(inspect(store.engine).get_table_names())
            return {t: ([(c[1], c[2], c[3], c[4], c[5]) for c in rows(store, f"PRAGMA table_info({t})")],
                        sorted(r[1] for r in rows(store, f"PRAGMA index_list({t})"))) for t in tables}

        assert "stops" in schema(fresh)
        assert schema(migrated) == schema(fresh)
        assert skip_pending(migrated, _stop("c"), T0) == 1
        assert sorted(r.status for r in rows(migrated, "SELECT status FROM tasks")) == ["done", "running", "skipped"]
    finally:
        migrated.close()
        fresh.close()
