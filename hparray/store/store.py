"""The task table: SQLAlchemy over SQLite (default `./results.db`) or any SQLAlchemy URL.

Every statement on the hot path (claim, heartbeat, finish, release, reap) is a named statement
in `sql/queries.sql`; the schema is the numbered migrations in `sql/migrations/`, applied on
open. Callers pass the clock (`now`) so that tests drive time instead of sleeping.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import create_engine, event, exc, text
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.sql.elements import TextClause

from hparray.environment import filesystem_type, this_host
from hparray.errors import StoreError, StoreUnreachable
from hparray.store import migrate, sqlite
from hparray.store.queries import SqliteResult, statement
from hparray.store.records import (
    ConfigName,
    ConfigProgress,
    FailedRow,
    LiveWorker,
    PlanCounts,
    ReapReport,
    RecentRows,
    ReportRow,
    RunningTask,
    SearchMember,
    SlurmWorker,
    SubmissionRecord,
    TaskCounts,
)
from hparray.store.urls import resolve_url
from hparray.tasks import STATUSES, ClaimedTask, TaskOutcome, TaskSpec

log = logging.getLogger(__name__)

R = TypeVar("R")
# text() re-parses its bind parameters with a regex on every call; the named statements are
# built once per dialect instead (a TextClause is immutable and safe to share between threads).
_CLAUSES: dict[str, TextClause] = {}


class Store:
    """One sweep's state. Open with `Store.open(url)`; safe to share between threads."""

    def __init__(self, engine: Engine, url: str):
        self.engine = engine
        self.url = url
        self.dialect = engine.dialect.name
        self.filesystem = ""
        self.journal_mode = ""
        self.readonly = False  # opened without write access: reads only (status, report)
        self.writer_lock: sqlite.WriterLock | None = None
        _refuse_inherited_connections(engine)

    # ------------------------------------------------------------------ opening

    @classmethod
    def open(cls, db: str | None = None, *, create: bool = True) -> Store:
        """Connect, migrate to the current schema and choose the journal mode.

        With `create=False` a missing SQLite file is an error that says to plan first.
        """
        url = resolve_url(db)
        try:
            parsed = make_url(url)
        except exc.ArgumentError:
            raise StoreUnreachable(f"--db {url!r} is not a database URL: use a file path or e.g. "
                                   "postgresql://user@host/db") from None
        if parsed.get_backend_name() == "sqlite":
            store = cls._open_sqlite(parsed.database or "", create)
        else:
            try:
                engine = create_engine(url, pool_pre_ping=True, pool_size=2, max_overflow=4)
            except (exc.ArgumentError, exc.NoSuchModuleError, ImportError) as err:
                raise StoreUnreachable(f"--db {url!r}: {err}: use sqlite:///path or postgresql://...") from None
            store = cls(engine, url)
        if store.readonly:
            migrate.require_current_schema(store)
        else:
            migrate.migrate(store)
        return store

    @classmethod
    def _open_sqlite(cls, database: str, create: bool) -> Store:
        path = Path(database)
        if database in ("", ":memory:"):
            raise StoreUnreachable("an in-memory SQLite database cannot be shared by workers: give a file path")
        if not create and not path.exists():
            raise StoreError(f"no database at {path}: run `hparray plan --search lr` first, or pass --db")
        if not path.parent.is_dir():
            raise StoreUnreachable(f"--db {path}: folder {path.parent} does not exist: create it or fix the path")
        # A database this process may not write (a read-only mount, a copy of a finished sweep
        # without write permission) is opened read-only: `status` and `report` still work.
        readonly = sqlite.is_readonly(path)
        store = cls(sqlite.sqlite_engine(path, readonly), f"sqlite:///{path}")
        store.filesystem = filesystem_type(path.parent)
        store.readonly = readonly
        try:
            if readonly:
                store.journal_mode = sqlite.pragma(store.engine, "journal_mode")
            else:
                store.writer_lock = sqlite.WriterLock.for_database(path)
                store.journal_mode = sqlite.pragma(store.engine, "journal_mode",
                                                   sqlite.wanted_journal_mode(store.filesystem))
        except sqlite3.DatabaseError as err:
            raise store._translate(err) from None
        except exc.DBAPIError as err:
            raise store._translate(err.orig or err) from None
        return store

    def _translate(self, err: BaseException) -> StoreError:
        message = " ".join(str(err).split())  # drivers wrap their messages over several lines
        if "file is not a database" in message or "file is encrypted" in message:
            return StoreUnreachable(f"{self.url} is not an SQLite database: move it away or point --db elsewhere")
        if "locked" in message:
            return self._locked()
        if "readonly" in message or "unable to open" in message:
            return StoreUnreachable(f"cannot write {self.url} ({message}): check the path and its permissions")
        return StoreUnreachable(f"cannot use database {self.url}: {message}: start the server or fix --db / HPARRAY_DB")

    def _locked(self) -> StoreError:
        return StoreError(f"{self.url} stayed locked by another process for over {sqlite.SQLITE_BUSY_TIMEOUT_S:.0f} "
                          "s: find the process holding it (fuser) or try again")

    def schema_version(self) -> int:
        with self._read() as conn:
            return conn.execute(text("SELECT MAX(version) FROM schema_migrations")).scalar() or 0

    # ------------------------------------------------------------------ transactions

    @contextmanager
    def _write(self, ordered: bool = True) -> Iterator[Connection]:
        """One write transaction. `ordered` writers queue on the writer lock first (fair turns for
        claims under contention); the others (heartbeats) go straight to SQLite's busy handler, so
        a queue of claimers never delays a beat."""
        lock = (self.writer_lock.held(sqlite.SQLITE_BUSY_TIMEOUT_S) if self.writer_lock and ordered
                else nullcontext())
        try:
            with lock, self.engine.begin() as conn:
                yield conn
        except sqlite.LockTimeout:
            raise self._locked() from None
        except exc.OperationalError as err:
            raise self._translate(err.orig or err) from None
        except exc.DatabaseError as err:
            if isinstance(err.orig, sqlite3.DatabaseError) or "connect" in str(err):
                raise self._translate(err.orig or err) from None
            raise
        except sqlite3.DatabaseError as err:  # from BEGIN and _run, which go straight to sqlite3
            raise self._translate(err) from None

    @contextmanager
    def _read(self) -> Iterator[Connection]:
        try:
            with self.engine.connect().execution_options(readonly=True) as conn, conn.begin():
                yield conn
        except exc.OperationalError as err:
            raise self._translate(err.orig or err) from None
        except sqlite3.OperationalError as err:  # from BEGIN, which goes straight to sqlite3
            raise self._translate(err) from None

    def _run(self, conn: Connection, name: str, params: dict[str, Any] | None = None) -> Any:
        if self.dialect == "sqlite" and not conn.get_execution_options().get("readonly"):
            # Inside a write transaction on SQLite the statement goes straight to the sqlite3
            # cursor: SQLAlchemy's execution and result machinery cost ~100 us a statement, over
            # two thirds of a claim's CPU, and every microsecond of it is spent holding the lock.
            return SqliteResult(sqlite.driver(conn).execute(statement(name, self.dialect), params or {}))
        key = f"{name}.{self.dialect}"
        clause = _CLAUSES.get(key)
        if clause is None:
            clause = _CLAUSES[key] = text(statement(name, self.dialect))
        return conn.execute(clause, params or {})

    # ------------------------------------------------------------------ planning

    def apply_plan(self, configs: Iterable[dict[str, Any]], search_configs: Iterable[dict[str, Any]],
                   videos: Iterable[dict[str, Any]], tasks: list[TaskSpec], max_attempts: int,
                   now: float, max_losses: int = 10) -> PlanCounts:
        """Insert what is missing, in one transaction; rows already there are never touched."""
        with self._write() as conn:
            new_configs = sum(self._run(conn, "insert_config", {**row, "now": now}).rowcount for row in configs)
            for row in search_configs:
                self._run(conn, "insert_search_config", row)
            for row in videos:
                self._run(conn, "insert_video", row)
            ids = self._task_ids(conn)
            new_tasks = existing = 0
            for spec in tasks:
                key = (spec.config_hash, spec.video)
                if key in ids:
                    existing += 1
                    continue
                inserted = self._run(conn, "insert_task", {
                    "config_hash": spec.config_hash, "video": spec.video, "kind": spec.kind,
                    "depends_on": ids[spec.depends_on] if spec.depends_on else None, "priority": spec.priority,
                    "max_attempts": max_attempts, "max_losses": max_losses, "estimate_s": spec.estimate_s,
                    "now": now})
                ids[key] = inserted.lastrowid if self.dialect == "sqlite" else inserted.scalar_one()
                new_tasks += 1
        return PlanCounts(new_tasks=new_tasks, existing_tasks=existing, new_configs=new_configs)

    def _task_ids(self, conn: Connection) -> dict[tuple[str, str], int]:
        return {(row.config_hash, row.video): row.id for row in self._run(conn, "task_ids")}

    def existing_task_keys(self) -> set[tuple[str, str]]:
        """(config_hash, video) of every row, for `plan --dry-run`."""
        with self._read() as conn:
            return set(self._task_ids(conn))

    # ------------------------------------------------------------------ the worker's path

    def claim(self, worker_id: str, now: float) -> ClaimedTask | None:
        """Atomically take the first pending row whose dependency is done; start its attempt."""
        lease = uuid.uuid4().hex
        params = {"lease": lease, "worker_id": worker_id, "now": now}
        with self._write() as conn:
            if self.dialect != "sqlite" or sqlite.HAS_RETURNING:
                row = self._run(conn, "claim", params).first()
                if row is None:
                    return None
                task_id = row.id
            else:
                candidate = self._run(conn, "claim_candidate").first()
                if candidate is None:
                    return None
                task_id = candidate.id
                self._run(conn, "claim_by_id", {**params, "task_id": task_id})
            info = self._run(conn, "claimed_task", {"task_id": task_id}).one()
            self._run(conn, "start_attempt",
                      {"task_id": task_id, "lease": lease, "number": info.attempts, "worker_id": worker_id,
                       "now": now})
            self._run(conn, "watch_claim", {"lease": lease, "worker_id": worker_id, "now": now})
            self._beat_worker(conn, worker_id, task_id, now)
        return ClaimedTask(
            id=task_id, lease=lease, attempt=info.attempts, max_attempts=info.max_attempts, kind=info.kind,
            config_hash=info.config_hash, video=info.video, video_path=info.video_path, category=info.category,
            caption=info.caption, video_seed=info.video_seed, lr=info.lr, condition_frames=info.condition_frames,
            finetune_steps=info.finetune_steps, estimate_s=info.estimate_s,
        )

    def waiting_work(self) -> int:
        """Pending rows that wait on a dependency still pending or running (worth polling for)."""
        with self._read() as conn:
            return int(self._run(conn, "waiting_work").scalar() or 0)

    def heartbeat(self, task: ClaimedTask, worker_id: str, now: float) -> bool:
        """Count a heartbeat of the row; False when the lease was lost (reaped, reclaimed)."""
        with self._write(ordered=False) as conn:
            alive = self._run(conn, "heartbeat_task", {"task_id": task.id, "lease": task.lease, "now": now}).rowcount
            if alive != 1:
                self._fenced(conn, task, "heartbeat", now)
            else:
                self._run(conn, "watch_task_beat",
                          {"task_id": task.id, "lease": task.lease, "worker_id": worker_id, "now": now})
            self._run(conn, "heartbeat_attempt", {"lease": task.lease, "now": now})
            self._beat_worker(conn, worker_id, task.id, now)
        return alive == 1

    def _beat_worker(self, conn: Connection, worker_id: str, task_id: int | None, now: float) -> None:
        self._run(conn, "heartbeat_worker", {"worker_id": worker_id, "task_id": task_id, "now": now})
        self._run(conn, "watch_worker_beat", {"worker_id": worker_id, "now": now})

    def finish(self, task: ClaimedTask, outcome: TaskOutcome, now: float) -> bool:
        """Record the result; False (and an event) when the lease is no longer this attempt's."""
        timings = outcome.timings_s
        with self._write() as conn:
            won = self._run(conn, "finish_task",
                            {"task_id": task.id, "lease": task.lease, "status": outcome.status, "now": now}).rowcount
            if won != 1:
                self._fenced(conn, task, "finish", now)
                return False
            self._run(conn, "insert_result", {
                "task_id": task.id, "lease": task.lease, "status": outcome.status, "now": now,
                **{key: outcome.metrics.get(key) for key in ("psnr", "ssim", "lpips")},
                **{f"trivial_{key}": outcome.trivial_metrics.get(key) for key in ("psnr", "ssim", "lpips")},
                **{f"{key}_s": timings.get(key) for key in ("load", "finetune", "inference", "metrics", "wall")},
                "peak_memory_mb": outcome.peak_memory_mb, "lpips_weights": outcome.lpips_weights,
                "artifact_dir": outcome.artifact_dir, "details": json.dumps(outcome.details, default=str),
                "per_frame": json.dumps(outcome.per_frame) if outcome.per_frame else None,
            })
            self._run(conn, "end_attempt", {"lease": task.lease, "now": now, "outcome": outcome.status,
                                            "error": None, "traceback": None})
            self._run(conn, "worker_task_done", {"lease": task.lease, "now": now})
        return True

    def fail(self, task: ClaimedTask, error: str, traceback: str, now: float) -> str | None:
        """The attempt raised: retry (pending) or give up (failed). Returns the row's new status."""
        with self._write() as conn:
            changed = self._run(conn, "fail_task",
                                {"task_id": task.id, "lease": task.lease, "error": error, "now": now}).rowcount
            if changed != 1:
                self._fenced(conn, task, "fail", now)
                return None
            self._run(conn, "end_attempt", {"lease": task.lease, "now": now, "outcome": "error",
                                            "error": error, "traceback": traceback})
            return self._run(conn, "task_status", {"task_id": task.id}).scalar()

    def release(self, task: ClaimedTask, reason: str, now: float) -> bool:
        """Put the row back to pending without spending an attempt (clean stop)."""
        with self._write() as conn:
            changed = self._run(conn, "release_task", {"task_id": task.id, "lease": task.lease}).rowcount
            if changed != 1:
                self._fenced(conn, task, "release", now)
                return False
            self._run(conn, "end_attempt", {"lease": task.lease, "now": now, "outcome": "released",
                                            "error": reason, "traceback": None})
            self._run(conn, "log_event", {"now": now, "kind": "released", "task_id": task.id,
                                          "lease": task.lease, "worker_id": None, "message": reason})
        return True

    def _fenced(self, conn: Connection, task: ClaimedTask, action: str, now: float) -> None:
        """Record a write by an attempt that lost its row: the attempt ends 'fenced' (its worker was
        alive, only slow) and an event says what was ignored."""
        message = f"{action} by attempt {task.attempt} ignored: its lease is no longer the row's"
        first = self._run(conn, "fence_attempt", {"lease": task.lease, "now": now, "error": message}).rowcount
        if action == "heartbeat" and not first:
            return  # the heartbeat thread beats until its task returns: one event per attempt is enough
        log.warning("task %s: %s", task.id, message)
        self._run(conn, "log_event", {"now": now, "kind": "fenced", "task_id": task.id, "lease": task.lease,
                                      "worker_id": None, "message": message})

    # ------------------------------------------------------------------ workers

    def register_worker(self, worker_id: str, host: str, pid: int, now: float, *, gpu: str | None = None,
                        slurm: dict[str, str | None] | None = None) -> None:
        slurm = slurm or {}
        with self._write() as conn:
            self._run(conn, "register_worker", {
                "worker_id": worker_id, "host": host, "pid": pid, "gpu": gpu, "now": now,
                "slurm_job_id": slurm.get("job_id"), "slurm_array_job_id": slurm.get("array_job_id"),
                "slurm_array_task_id": slurm.get("array_task_id"),
            })
            self._run(conn, "watch_worker_beat", {"worker_id": worker_id, "now": now})

    def worker_heartbeat(self, worker_id: str, now: float) -> None:
        with self._write(ordered=False) as conn:
            self._beat_worker(conn, worker_id, None, now)

    def stop_worker(self, worker_id: str, now: float, state: str = "stopped") -> None:
        with self._write() as conn:
            self._run(conn, "stop_worker", {"worker_id": worker_id, "now": now, "state": state})

    # ------------------------------------------------------------------ reaping

    def reap(self, now: float, grace_s: float, gone_workers: Iterable[str] = (),
             observer: str | None = None) -> ReapReport:
        """Give back running rows whose heartbeat counter stood still for `grace_s` on the
        `observer` host's clock (`now`), and those held by `gone_workers` (known dead: the process
        exited, Slurm forgot the job) at once. A lost attempt spends one of the row's max_losses.

        No stamp written on one node is ever compared with another node's clock: the observer
        records when it saw each counter change (liveness, migration 0002), and a row it sees for
        the first time waits a whole grace. Workers on the observer's own host record their beats
        for it as they beat, so it judges them at once.
        """
        observer = observer or this_host()
        gone = set(gone_workers)
        released: list[int] = []
        failed: list[int] = []
        with self._write() as conn:
            seen = {row.subject: (row.beats, row.seen_at)
                    for row in self._run(conn, "seen_by", {"observer": observer})}

            def silent_for(subject: str, beats: int) -> float | None:
                """Seconds the counter has stood still on this observer's clock; None when it just moved."""
                last = seen.get(subject)
                if last is None or last[0] != beats:
                    self._run(conn, "watch", {"subject": subject, "observer": observer, "beats": beats, "now": now})
                    return None
                return now - last[1]

            for row in [RunningTask(*r) for r in self._run(conn, "running_tasks")]:
                silent = silent_for(row.lease, row.beats)
                stale = silent is not None and silent > grace_s
                if not stale and row.worker_id not in gone:
                    continue
                why = (f"worker {row.worker_id} is gone" if row.worker_id in gone else
                       f"worker {row.worker_id} silent for {silent:.0f} s on {observer}'s clock "
                       f"(grace {grace_s:.0f} s)")
                final = (f"lost {row.losses + 1} times: its worker died or vanished every time it ran this row "
                         f"(out of memory? a node fault? preemption?); last: {why}")
                changed = self._run(conn, "reap_task", {"task_id": row.id, "lease": row.lease, "error": why,
                                                        "final_error": final, "now": now}).rowcount
                if changed != 1:
                    continue
                self._run(conn, "end_attempt", {"lease": row.lease, "now": now, "outcome": "reaped",
                                                "error": why, "traceback": None})
                self._run(conn, "log_event", {"now": now, "kind": "reaped", "task_id": row.id, "lease": row.lease,
                                              "worker_id": row.worker_id, "message": why})
                status = self._run(conn, "task_status", {"task_id": row.id}).scalar()
                (failed if status == "failed" else released).append(row.id)
            for worker in list(self._run(conn, "running_workers")):
                silent = silent_for(f"worker:{worker.id}", worker.beats)
                if worker.id in gone or (silent is not None and silent > grace_s):
                    self._run(conn, "stop_worker", {"worker_id": worker.id, "now": now, "state": "lost"})
            self._run(conn, "forget_ended")
        return ReapReport(released=released, failed=failed)

    # ------------------------------------------------------------------ typed reads (status, report, Slurm)

    def _records(self, record: type[R], name: str, params: dict[str, Any] | None = None) -> list[R]:
        with self._read() as conn:
            return [record(**row._mapping) for row in self._run(conn, name, params)]

    def _value(self, name: str, params: dict[str, Any] | None = None) -> Any:
        with self._read() as conn:
            return self._run(conn, name, params).scalar()

    def task_counts(self) -> TaskCounts:
        """Rows by status and the pending ones blocked behind a failed or diverged dependency."""
        with self._read() as conn:
            by_status = {row.status: row.n for row in self._run(conn, "task_totals")}
            blocked = int(self._run(conn, "blocked_tasks").scalar() or 0)
        return TaskCounts(**{s: int(by_status.get(s, 0)) for s in STATUSES}, blocked=blocked)

    def largest_condition_frames(self) -> dict[str, int]:
        """{kind: the most conditioning frames of an unfinished row of that kind}."""
        with self._read() as conn:
            return {r.kind: int(r.condition_frames) for r in self._run(conn, "largest_unfinished_condition_frames")}

    def task_status(self, task_id: int) -> str | None:
        return self._value("task_status", {"task_id": task_id})

    def running_tasks(self) -> list[RunningTask]:
        return self._records(RunningTask, "running_tasks")

    def config_progress(self) -> list[ConfigProgress]:
        return self._records(ConfigProgress, "status_configs")

    def search_members(self) -> list[SearchMember]:
        return self._records(SearchMember, "search_configs")

    def config_names(self, config_hash: str) -> list[ConfigName]:
        return self._records(ConfigName, "config_names", {"config_hash": config_hash})

    def live_workers(self) -> list[LiveWorker]:
        return self._records(LiveWorker, "live_workers")

    def finished_since(self, since: float) -> RecentRows:
        return self._records(RecentRows, "finished_since", {"since": since})[0]

    def remaining_estimate_s(self) -> float:
        """Estimated seconds of the rows still to run (blocked rows left out)."""
        return float(self._value("remaining_estimate") or 0.0)

    def failed_rows(self, limit: int) -> list[FailedRow]:
        return self._records(FailedRow, "failed_rows", {"limit": limit})

    def durations(self, kind: str) -> list[float]:
        """Wall seconds of the latest finished rows of one kind (for expected durations)."""
        with self._read() as conn:
            return [float(row.wall_s) for row in self._run(conn, "durations_by_kind", {"kind": kind})]

    def report_rows(self) -> list[ReportRow]:
        return self._records(ReportRow, "report_rows")

    def submissions(self) -> list[SubmissionRecord]:
        return self._records(SubmissionRecord, "slurm_submissions")

    def slurm_workers(self) -> list[SlurmWorker]:
        return self._records(SlurmWorker, "slurm_live_workers")

    def record_submission(self, job_id: str, array_size: int, throttle: int, command: str, script: str,
                          now: float) -> None:
        with self._write() as conn:
            self._run(conn, "record_submission", {"job_id": job_id, "array_size": array_size, "throttle": throttle,
                                                  "now": now, "command": command, "script": script})

    def cancel_submission(self, job_id: str) -> None:
        """Mark a Slurm submission cancelled (its rows are released by the reaper)."""
        with self._write() as conn:
            self._run(conn, "slurm_cancel_submission", {"job_id": job_id})

    def close(self) -> None:
        self.engine.dispose()


def _refuse_inherited_connections(engine: Engine) -> None:
    """A forked child never uses (or closes) a pooled connection its parent opened: SQLite and
    libpq connections must not cross fork. SQLAlchemy's documented recipe: tag each connection
    with its pid, and on checkout in another process drop it from the pool and connect anew."""

    @event.listens_for(engine, "connect")
    def _remember_pid(_dbapi_connection: Any, record: Any) -> None:
        record.info["pid"] = os.getpid()

    @event.listens_for(engine, "checkout")
    def _check_pid(_dbapi_connection: Any, record: Any, proxy: Any) -> None:
        if record.info.get("pid") != os.getpid():
            record.dbapi_connection = proxy.dbapi_connection = None
            raise exc.DisconnectionError(f"connection opened by process {record.info.get('pid')}, not this one")
