"""`hparray retry`'s write (migration 0005's queries), beside the Store's own: failed or diverged rows
back to pending with fresh budgets, in one transaction.

The rows chosen keep every attempt they spent (`attempts` keeps counting, the `attempts` table keeps
each one with its error and traceback); their error and loss budgets start again, a diverged row's
result (no metrics) makes way for the next, and an event 'retried' per row says what it was. A
pending row that waits on a chosen row (an un-fine-tuned row that failed or diverged) runs once that
row is done; a row that is running is never touched, whatever the filters say.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from hparray.errors import BadInput

if TYPE_CHECKING:
    from hparray.store.store import Store

RETRYABLE = ("failed", "diverged")


@dataclass(frozen=True)
class RetrySelection:
    """Which rows to retry: those with one of `statuses` that match every filter given (a filter
    with several values matches any of them)."""

    statuses: tuple[str, ...] = ("failed",)
    configs: tuple[str, ...] = ()
    videos: tuple[str, ...] = ()
    searches: tuple[str, ...] = ()


@dataclass(frozen=True)
class RetryRow:
    """A row a retry changes (or, with a dry run, would), as it was before."""

    id: int
    kind: str
    config: str
    video: str
    status: str
    attempts: int
    error: str | None
    reason: str  # why it is in: "failed", "diverged", "failed; 2 matching rows wait on it", "waits on #id"
    waits_on: int | None = None  # an unblocked row: the retried row it waits on


@dataclass(frozen=True)
class RetryReport:
    """What a retry changed (or would): rows back to pending, the rows that waited on them, and the
    running rows that matched the filters and were left alone."""

    retried: list[RetryRow] = field(default_factory=list)
    unblocked: list[RetryRow] = field(default_factory=list)
    running: list[RetryRow] = field(default_factory=list)
    dry_run: bool = False


@dataclass
class _Row:
    id: int
    kind: str
    status: str
    video: str
    depends_on: int | None
    attempts: int
    error: str | None
    names: set[str] = field(default_factory=set)
    aliases: set[str] = field(default_factory=set)  # other names that pick it (plan's baseline_cf_N)
    searches: set[str] = field(default_factory=set)

    def as_retry(self, reason: str, waits_on: int | None = None) -> RetryRow:
        return RetryRow(id=self.id, kind=self.kind, config=min(self.names) if self.names else "?", video=self.video,
                        status=self.status, attempts=self.attempts, error=self.error, reason=reason,
                        waits_on=waits_on)


def _rows(candidates: Iterable[Any]) -> dict[int, _Row]:
    """retry_candidates' rows (one per task and search) as one _Row per task; an un-fine-tuned row
    goes by no_finetune_cf_N (plan calls it baseline_cf_N) and belongs to the searches of the rows that wait on it."""
    rows: dict[int, _Row] = {}
    for r in candidates:
        row = rows.get(r.id)
        if row is None:
            row = rows[r.id] = _Row(id=r.id, kind=r.kind, status=r.status, video=r.video, depends_on=r.depends_on,
                                    attempts=int(r.attempts), error=r.error)
            if r.kind == "baseline":
                row.names.add(f"no_finetune_cf_{r.condition_frames}")
                row.aliases.add(f"baseline_cf_{r.condition_frames}")
        if r.name is not None:
            row.names.add(r.name)
            row.searches.add(r.search)
    for row in list(rows.values()):
        if row.depends_on in rows:
            rows[row.depends_on].searches |= row.searches
    return rows


def _unknown(kind: str, flag: str, asked: tuple[str, ...], known: set[str]) -> None:
    missing = [name for name in asked if name not in known]
    if not missing:
        return
    close = difflib.get_close_matches(missing[0], sorted(known), n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    listed = ", ".join(sorted(known)[:12]) + (", ..." if len(known) > 12 else "")
    raise BadInput(f"retry {flag} {missing[0]}: no {kind} of that name in this sweep{hint}; "
                   f"its {kind}s: {listed or 'none'}")


def choose(candidates: Iterable[Any], selection: RetrySelection, dry_run: bool = False) -> RetryReport:
    """The rows `selection` retries, the pending rows that wait on them, and the running rows it
    matched and leaves alone. A blocked row that matches brings the row it waits on (when that row's
    status is selected). Names that are not in the sweep are refused (BadInput)."""
    rows = _rows(candidates)
    _unknown("config", "--config", selection.configs, {n for row in rows.values() for n in row.names | row.aliases})
    _unknown("video", "--video", selection.videos, {row.video for row in rows.values()})
    _unknown("search", "--search", selection.searches, {s for row in rows.values() for s in row.searches})

    def matches(row: _Row) -> bool:
        return ((not selection.videos or row.video in selection.videos)
                and (not selection.configs or bool((row.names | row.aliases) & set(selection.configs)))
                and (not selection.searches or bool(row.searches & set(selection.searches))))

    chosen = {row.id: row.as_retry(row.status) for row in rows.values()
              if row.status in selection.statuses and matches(row)}
    blocking: dict[int, int] = {}
    for row in rows.values():
        dependency = rows.get(row.depends_on) if row.depends_on is not None else None
        if (row.status == "pending" and dependency is not None and dependency.id not in chosen
                and dependency.status in selection.statuses and matches(row)):
            blocking[dependency.id] = blocking.get(dependency.id, 0) + 1
    for task_id, n in blocking.items():
        waiting = "1 matching row waits" if n == 1 else f"{n} matching rows wait"
        chosen[task_id] = rows[task_id].as_retry(f"{rows[task_id].status}; {waiting} on it")
    unblocked = [row.as_retry(f"waits on #{row.depends_on}", row.depends_on) for row in rows.values()
                 if row.status == "pending" and row.depends_on in chosen]
    running = [row.as_retry("running: left alone") for row in rows.values() if row.status == "running" and matches(row)]

    def order(found: Iterable[RetryRow]) -> list[RetryRow]:
        return sorted(found, key=lambda r: (r.kind != "baseline", r.config, r.video, r.id))

    return RetryReport(retried=order(chosen.values()), unblocked=order(unblocked), running=order(running),
                       dry_run=dry_run)


def retry(store: Store, selection: RetrySelection, now: float, dry_run: bool = False) -> RetryReport:
    """Put the rows `selection` chooses back to pending with fresh budgets, in one transaction (with
    `dry_run`, only say which). A row whose status changed meanwhile is left out."""
    if dry_run:
        with store._read() as conn:
            return choose(store._run(conn, "retry_candidates"), selection, dry_run=True)
    with store._write() as conn:
        report = choose(list(store._run(conn, "retry_candidates")), selection)
        retried = []
        for row in report.retried:
            if store._run(conn, "retry_task", {"task_id": row.id, "status": row.status}).rowcount != 1:
                continue
            store._run(conn, "retry_drop_result", {"task_id": row.id})
            last = f": {row.error.splitlines()[0][:300]}" if row.error else ""
            store._run(conn, "log_event", {
                "now": now, "kind": "retried", "task_id": row.id, "lease": None, "worker_id": None,
                "message": f"retried: {row.status} after {row.attempts} attempts, pending again with fresh "
                           f"budgets{last}"})
            retried.append(row)
        chosen = {row.id for row in retried}
        unblocked = [row for row in report.unblocked if row.waits_on in chosen]
    return RetryReport(retried=retried, unblocked=unblocked, running=report.running)


def retried_counts(store: Store) -> dict[int, int]:
    """{task id: how many times `hparray retry` put it back}, for rows retried at least once."""
    with store._read() as conn:
        return {int(row.task_id): int(row.n) for row in store._run(conn, "retried_counts")}
