"""The store's side of `notify:` (migration 0005): a key per event, inserted once, so that of N
workers that see the same event at the same moment exactly one runs the command. Nothing here runs
it (hparray.notify does)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from hparray.store.records import FailedRow, TaskCounts
from hparray.tasks import STATUSES

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection

    from hparray.store.store import Store


def _counts(store: Store, conn: Connection) -> TaskCounts:
    by_status = {row.status: int(row.n) for row in store._run(conn, "task_totals")}
    blocked = int(store._run(conn, "blocked_tasks").scalar() or 0)
    return TaskCounts(**{s: by_status.get(s, 0) for s in STATUSES}, blocked=blocked)


def claim_sweep_complete(store: Store, sender: str, now: float) -> bool:
    """True for exactly one caller once nothing is left to run (no row runnable or running; rows that
    failed, diverged or wait behind one may remain). The key counts rows and attempts, so a sweep
    that gets more work (a plan, a retry) and finishes again is a new event."""
    with store._write() as conn:
        if _counts(store, conn).to_run:
            return False
        generation = store._run(conn, "sweep_generation").one()
        key = f"sweep:{int(generation.tasks)}:{int(generation.attempts)}"
        return bool(store._run(conn, "claim_notification", {"key": key, "kind": "sweep_complete", "task_id": None,
                                                             "sender": sender, "now": now}).rowcount == 1)


def claim_row_failed(store: Store, task_id: int, sender: str, now: float) -> bool:
    """True for exactly one caller per time the row failed for good (a retried row that fails
    again is a new event); False while it is not failed."""
    with store._write() as conn:
        row = store._run(conn, "notify_row", {"task_id": task_id}).first()
        if row is None or row.status != "failed":
            return False
        key = f"failed:{task_id}:{int(row.attempts)}"
        return bool(store._run(conn, "claim_notification", {"key": key, "kind": "row_failed", "task_id": task_id,
                                                             "sender": sender, "now": now}).rowcount == 1)


def failed_row(store: Store, task_id: int) -> FailedRow | None:
    """The row as `status` lists failed rows (its config's name, errors, losses, last error)."""
    with store._read() as conn:
        row = store._run(conn, "notify_row", {"task_id": task_id}).first()
    if row is None:
        return None
    return FailedRow(id=row.id, kind=row.kind, video=row.video, errors=int(row.errors), losses=int(row.losses),
                     error=row.error, config_name=row.config_name)


def sweep_span(store: Store) -> tuple[float | None, float | None]:
    """When the sweep's first attempt started and its last one ended (None before any)."""
    with store._read() as conn:
        row = store._run(conn, "sweep_span").one()
    return (None if row.started_at is None else float(row.started_at),
            None if row.ended_at is None else float(row.ended_at))
