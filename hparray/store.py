"""The task table: SQLAlchemy over SQLite (default `./results.db`) or any SQLAlchemy URL.

Every statement on the hot path (claim, heartbeat, finish, release, reap) is a named statement
in `sql/queries.sql`; the schema is the numbered migrations in `sql/migrations/`, applied on
open. Callers pass the clock (`now`) so that tests drive time instead of sleeping.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import socket
import sqlite3
import threading
import time
import uuid
from collections import namedtuple
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import lru_cache
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, event, exc, text
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.pool import QueuePool
from sqlalchemy.sql.elements import TextClause

from hparray import resources
from hparray.errors import StoreError, StoreUnreachable
from hparray.tasks import ClaimedTask, TaskOutcome, TaskSpec

log = logging.getLogger(__name__)

DEFAULT_DB = "results.db"
# 64 workers queueing behind one writer each holding the lock for ~1 ms never get near this;
# it only has to outlast a slow checkpoint or a stalled NFS lock server.
SQLITE_BUSY_TIMEOUT_S = float(os.environ.get("HPARRAY_SQLITE_BUSY_TIMEOUT_S", "60"))
NETWORK_FILESYSTEMS = {
    "nfs", "nfs4", "lustre", "gpfs", "cifs", "smb3", "smbfs", "beegfs", "ceph", "fuse.sshfs",
    "glusterfs", "fuse.glusterfs", "panfs", "9p", "afs", "fuse.ceph", "wekafs", "fuse.juicefs",
}
HAS_RETURNING = sqlite3.sqlite_version_info >= (3, 35, 0)


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


def migration_files() -> list[Traversable]:
    """`sql/migrations/NNNN_*.sql`, in the order they apply."""
    folder = resources.sql().joinpath("migrations")
    return sorted((f for f in folder.iterdir() if re.fullmatch(r"\d{4}_\w+\.sql", f.name)), key=lambda f: f.name)
# text() re-parses its bind parameters with a regex on every call; the named statements are
# built once per dialect instead (a TextClause is immutable and safe to share between threads).
_CLAUSES: dict[str, TextClause] = {}


class WriterLock:
    """Serializes the writers of one SQLite file through a blocking flock() on `<db>-lock`.

    SQLite's busy handler sleeps and polls (1, 2, 5 ... 100 ms): under contention a writer that
    is asleep when the lock frees misses it, again and again, so with 32 processes only a third
    of them ever got a task and some claims waited 5-10 s. A process blocked in flock() is woken
    by the kernel the moment the holder lets go, so every waiter gets its turn within a few
    rounds. Taken just before BEGIN IMMEDIATE, released after COMMIT or ROLLBACK. (A strict
    first-come-first-served ticket lock was measured too: it bounds the longest wait better but
    hands the lock to a sleeping process every time, which halved throughput on a loaded
    machine, and a queued writer that is stopped would hold up everyone behind it.)

    It only orders writers: SQLite's own lock and busy timeout still guard every write. Where
    flock fails (Lustre mounted without -o flock, a lock file that cannot be created) it is
    switched off with one warning; HPARRAY_SQLITE_WRITER_LOCK=0 switches it off by hand. The
    kernel drops a flock when its holder dies, however it dies. On NFS flock is emulated with
    POSIX locks, which belong to the process, not to the descriptor, so there is one WriterLock
    per file per process (`for_database`), entered by one thread at a time (the RLock).
    """

    def __init__(self, path: Path):
        self.path = path
        self.enabled = os.environ.get("HPARRAY_SQLITE_WRITER_LOCK", "1") != "0"
        self._pid = -1
        self._fd: int | None = None
        self._thread_lock = threading.RLock()
        self._depth = 0

    @classmethod
    def for_database(cls, database: Path) -> WriterLock:
        """The process's one lock for this database file."""
        resolved = database.resolve()
        path = resolved.with_name(resolved.name + "-lock")
        return _WRITER_LOCKS.setdefault(str(path), cls(path))

    @contextmanager
    def held(self, timeout_s: float) -> Iterator[None]:
        """Hold the lock for one write transaction; LockTimeout after `timeout_s` of waiting, the
        same bound as SQLite's own busy timeout."""
        if not self.enabled:
            yield
            return
        if self._pid != os.getpid():
            # First use, or a forked child: its copy of the descriptor shares the parent's flock,
            # and the RLock may have been held by a thread that does not exist here.
            if self._fd is not None:
                os.close(self._fd)
            self._pid, self._fd, self._thread_lock, self._depth = os.getpid(), None, threading.RLock(), 0
        deadline = time.monotonic() + timeout_s
        if not self._thread_lock.acquire(timeout=timeout_s):
            raise LockTimeout(self.path, timeout_s)
        try:
            locked = self._depth > 0 or self._lock(deadline, timeout_s)
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
                if self._depth == 0 and locked and self._fd is not None:
                    try:
                        fcntl.flock(self._fd, fcntl.LOCK_UN)
                    except OSError as err:
                        self._disable(err)
        finally:
            self._thread_lock.release()

    def _lock(self, deadline: float, timeout_s: float) -> bool:
        try:
            if self._fd is None:
                self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                return self._wait(deadline, timeout_s)
        except OSError as err:
            self._disable(err)
            return False

    def _wait(self, deadline: float, timeout_s: float) -> bool:
        """Wait in the kernel for the lock (woken the moment its holder lets go), until `deadline`.

        A holder that is stopped inside its transaction (Ctrl-Z, a debugger, a frozen VM, an NFS
        stall) must not hang every other process. flock() has no timeout, so the blocking call runs
        in a helper thread; when time is up the thread keeps the descriptor, and lets go of the lock
        and closes the descriptor whenever it gets it, while this process opens a fresh one.
        """
        fd = self._fd
        assert fd is not None
        state = ["waiting"]
        guard, done = threading.Lock(), threading.Event()

        def wait() -> None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                got: OSError | None = None
            except OSError as err:
                got = err
            with guard:
                if state[0] == "abandoned":
                    with contextlib.suppress(OSError):
                        if got is None:
                            fcntl.flock(fd, fcntl.LOCK_UN)
                        os.close(fd)
                else:
                    state[0] = "acquired" if got is None else f"failed: {got}"
            done.set()

        threading.Thread(target=wait, name="writer-lock-wait", daemon=True).start()
        done.wait(max(0.0, deadline - time.monotonic()))
        with guard:
            if state[0] == "acquired":
                return True
            if state[0].startswith("failed"):
                raise OSError(state[0])
            state[0] = "abandoned"
            self._fd = None
        raise LockTimeout(self.path, timeout_s)

    def _disable(self, err: OSError) -> None:
        self.enabled = False
        if self._fd is not None:
            try:  # explicitly: a forked child may still hold a copy of the descriptor
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            except OSError:
                pass
            os.close(self._fd)
            self._fd = None
        log.warning("cannot flock %s (%s): writers fall back to SQLite's busy handler alone", self.path, err)


_WRITER_LOCKS: dict[str, WriterLock] = {}


class LockTimeout(Exception):
    """The writer lock was not had within the busy timeout (the store turns it into a StoreError)."""

    def __init__(self, path: Path, timeout_s: float):
        super().__init__(f"{path} held for over {timeout_s:.0f} s")
        self.path, self.timeout_s = path, timeout_s


@dataclass(frozen=True)
class PlanCounts:
    """What applying a plan did: rows added and rows that were already there."""

    new_tasks: int
    existing_tasks: int
    new_configs: int


@dataclass(frozen=True)
class ReapReport:
    """Rows the reaper gave back (pending again) or gave up on (failed)."""

    released: list[int]
    failed: list[int]


def this_host() -> str:
    """This machine's name as workers record it (and as a reaper names the clock it judges by)."""
    return socket.gethostname().split(".")[0]


def resolve_url(db: str | None) -> str:
    """`--db` / `HPARRAY_DB` / `./results.db`; a bare path means an SQLite file."""
    db = db or os.environ.get("HPARRAY_DB") or DEFAULT_DB
    if "://" not in db:
        return f"sqlite:///{Path(db).expanduser().resolve()}"
    if db.startswith("postgresql://") or db.startswith("postgres://"):
        # SQLAlchemy's default PostgreSQL driver is psycopg2; hparray ships psycopg 3.
        db = "postgresql+psycopg://" + db.split("://", 1)[1]
    return db


def filesystem_type(path: Path) -> str:
    """The filesystem type holding `path`, from /proc/mounts (longest matching mount point)."""
    path = path.resolve()
    best, kind = "", "unknown"
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return kind
    for line in mounts:
        parts = line.split()
        if len(parts) < 3:
            continue
        mount = parts[1].replace("\\040", " ")
        if (str(path) == mount or str(path).startswith(mount.rstrip("/") + "/")) and len(mount) >= len(best):
            best, kind = mount, parts[2]
    return kind


class Store:
    """One sweep's state. Open with `Store.open(url)`; safe to share between threads."""

    def __init__(self, engine: Engine, url: str):
        self.engine = engine
        self.url = url
        self.dialect = engine.dialect.name
        self.filesystem = ""
        self.journal_mode = ""
        self.readonly = False  # opened without write access: reads only (status, report)
        self.writer_lock: WriterLock | None = None
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
            raise StoreUnreachable(
                f"--db {url!r} is not a database URL: use a file path or e.g. postgresql://user@host/db"
            ) from None
        if parsed.get_backend_name() == "sqlite":
            store = cls._open_sqlite(url, parsed.database or "", create)
        else:
            try:
                engine = create_engine(url, pool_pre_ping=True, pool_size=2, max_overflow=4)
            except (exc.ArgumentError, exc.NoSuchModuleError, ImportError) as err:
                raise StoreUnreachable(f"--db {url!r}: {err}: use sqlite:///path or postgresql://...") from None
            store = cls(engine, url)
        if store.readonly:
            store._require_current_schema()
        else:
            store._migrate()
        return store

    @classmethod
    def _open_sqlite(cls, url: str, database: str, create: bool) -> Store:
        path = Path(database)
        if database in ("", ":memory:"):
            raise StoreUnreachable("an in-memory SQLite database cannot be shared by workers: give a file path")
        if not create and not path.exists():
            raise StoreError(f"no database at {path}: run `hparray plan --search lr` first, or pass --db")
        if not path.parent.is_dir():
            raise StoreUnreachable(f"--db {path}: folder {path.parent} does not exist: create it or fix the path")
        # A pooled connection per thread, kept between transactions. A connection per transaction
        # (NullPool) cost an open() and three PRAGMAs every time and, in WAL mode, a checkpoint and
        # deletion of the WAL file whenever the last connection closed: 30-40 ms per claim in one
        # process. An idle connection holds no lock; a forked child never reuses its parent's
        # connections (_refuse_inherited_connections). Two connections cover the worker's main
        # and heartbeat threads; pysqlite lets a pooled file connection move between threads.
        # A database this process may not write (a read-only mount, a copy of a finished sweep
        # without write permission) is opened read-only: `status` and `report` still work. WAL needs
        # its -shm file, which such a folder cannot hold: then the file is read as immutable.
        readonly = path.exists() and not (os.access(path, os.W_OK) and os.access(path.parent, os.W_OK))
        if readonly:
            immutable = not (Path(f"{path}-shm").exists() and Path(f"{path}-wal").exists())
            url = f"sqlite:///file:{path}?mode=ro&uri=true" + ("&immutable=1" if immutable else "")
        engine = create_engine(url, poolclass=QueuePool, pool_size=2, max_overflow=8,
                               connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S})

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_connection: Any, _record: Any) -> None:
            # Take transaction control from pysqlite so BEGIN IMMEDIATE means what it says.
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            cursor.execute(f"PRAGMA busy_timeout = {int(SQLITE_BUSY_TIMEOUT_S * 1000)}")
            cursor.execute("PRAGMA foreign_keys = ON")
            cursor.execute("PRAGMA synchronous = NORMAL")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn: Connection) -> None:
            # Writers take the lock up front: a deferred transaction that upgrades to a write
            # fails with SQLITE_BUSY without ever waiting on busy_timeout.
            mode = "BEGIN" if conn.get_execution_options().get("readonly") else "BEGIN IMMEDIATE"
            _sqlite3(conn).execute(mode)  # straight to sqlite3, as in _run

        store = cls(engine, f"sqlite:///{path}")
        store.filesystem = filesystem_type(path.parent)
        store.readonly = readonly
        if readonly:
            store.journal_mode = store._pragma("journal_mode")
        else:
            store.writer_lock = WriterLock.for_database(path)
            store._choose_journal_mode(path)
        return store

    def _pragma(self, name: str) -> str:
        try:
            raw = self.engine.raw_connection()
            try:
                return str(raw.cursor().execute(f"PRAGMA {name}").fetchone()[0])
            finally:
                raw.close()
        except sqlite3.DatabaseError as err:
            raise self._translate(err) from None

    def _choose_journal_mode(self, path: Path) -> None:
        """WAL on a local disk; the rollback journal where WAL's shared memory cannot work."""
        wanted = "delete" if self.filesystem in NETWORK_FILESYSTEMS else "wal"
        wanted = os.environ.get("HPARRAY_SQLITE_JOURNAL", wanted).lower()
        try:
            raw = self.engine.raw_connection()
            try:
                cursor = raw.cursor()
                current = cursor.execute("PRAGMA journal_mode").fetchone()[0]
                if current != wanted:
                    current = cursor.execute(f"PRAGMA journal_mode = {wanted}").fetchone()[0]
                self.journal_mode = current
            finally:
                raw.close()
        except sqlite3.DatabaseError as err:
            raise self._translate(err) from None
        except exc.DBAPIError as err:
            raise self._translate(err.orig or err) from None

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
        return StoreError(
            f"{self.url} stayed locked by another process for over {SQLITE_BUSY_TIMEOUT_S:.0f} s: "
            "find the process holding it (fuser) or try again"
        )

    def _applied_versions(self) -> set[int]:
        """Versions recorded in schema_migrations (none when the table does not exist yet)."""
        exists = ("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_migrations'"
                  if self.dialect == "sqlite" else "SELECT to_regclass('schema_migrations') IS NOT NULL")
        with self._read() as conn:
            if not conn.execute(text(exists)).scalar():
                return set()
            return {row[0] for row in conn.execute(text("SELECT version FROM schema_migrations"))}

    def _require_current_schema(self) -> None:
        have, want = self._applied_versions(), {int(f.name[:4]) for f in migration_files()}
        if not have:
            raise StoreUnreachable(f"{self.url} holds no hparray sweep: point --db at a sweep's database")
        if want - have:
            raise StoreError(f"{self.url} has schema v{max(have)} and this hparray needs v{max(want)}, but it is "
                             "read-only here: run any hparray command once where it can be written, to migrate it")
        if have - want:
            raise StoreError(f"{self.url} has schema v{max(have)}, newer than this hparray (v{max(want)}): "
                             "upgrade hparray")

    def _migrate(self) -> None:
        """Apply every `sql/migrations/NNNN_*.sql` newer than the recorded version, one transaction each.

        Nothing is written when the schema is current: a reader must not queue for the writer lock
        (or fail on a read-only file) just to learn that there is nothing to do."""
        migrations = migration_files()
        if {int(f.name[:4]) for f in migrations} <= self._applied_versions():
            return
        serial = ("INTEGER PRIMARY KEY" if self.dialect == "sqlite"
                  else "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY")
        with self._write() as conn:
            if self.dialect == "postgresql":  # CREATE TABLE IF NOT EXISTS races on PostgreSQL (pg_type)
                conn.execute(text("SELECT pg_advisory_xact_lock(7243001)"))
            conn.execute(text(
                "CREATE TABLE IF NOT EXISTS schema_migrations "
                "(version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at DOUBLE PRECISION NOT NULL)"
            ))
        for file in migrations:
            version = int(file.name[:4])
            with self._write() as conn:
                if self.dialect == "postgresql":  # concurrent workers opening a fresh database
                    conn.execute(text("SELECT pg_advisory_xact_lock(7243001)"))
                done = conn.execute(text("SELECT 1 FROM schema_migrations WHERE version = :v"), {"v": version})
                if done.first():
                    continue
                for statement in _split_sql(file.read_text().replace("{{SERIAL_PK}}", serial)):
                    conn.execute(text(statement))
                conn.execute(
                    text("INSERT INTO schema_migrations (version, name, applied_at) VALUES (:v, :n, :t)"),
                    {"v": version, "n": file.name.removesuffix(".sql"), "t": time.time()},
                )
                log.info("applied migration %s", file.name)

    def schema_version(self) -> int:
        with self._read() as conn:
            return conn.execute(text("SELECT MAX(version) FROM schema_migrations")).scalar() or 0

    # ------------------------------------------------------------------ transactions

    @contextmanager
    def _write(self, ordered: bool = True) -> Iterator[Connection]:
        """One write transaction. `ordered` writers queue on the writer lock first (fair turns for
        claims under contention); the others (heartbeats) go straight to SQLite's busy handler, so
        a queue of claimers never delays a beat."""
        lock = self.writer_lock.held(SQLITE_BUSY_TIMEOUT_S) if self.writer_lock and ordered else nullcontext()
        try:
            with lock, self.engine.begin() as conn:
                yield conn
        except LockTimeout:
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
        key = f"{name}.{self.dialect}"
        if self.dialect == "sqlite" and not conn.get_execution_options().get("readonly"):
            # Inside a write transaction on SQLite the statement goes straight to the sqlite3
            # cursor: SQLAlchemy's execution and result machinery cost ~100 us a statement, over
            # two thirds of a claim's CPU, and every microsecond of it is spent holding the lock.
            sql = QUERIES.get(key) or QUERIES[name]
            return _SqliteResult(_sqlite3(conn).execute(sql, params or {}))
        clause = _CLAUSES.get(key)
        if clause is None:
            clause = _CLAUSES[key] = text(QUERIES.get(key) or QUERIES[name])
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
            if self.dialect != "sqlite" or HAS_RETURNING:
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

    def running_tasks(self) -> list[Any]:
        """Running rows with the Slurm ids of the worker holding them (for the Slurm-aware reaper)."""
        with self._read() as conn:
            return list(self._run(conn, "running_tasks"))

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

            for row in list(self._run(conn, "running_tasks")):
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

    # ------------------------------------------------------------------ reading for status and reports

    def fetch(self, name: str, params: dict[str, Any] | None = None) -> list[Any]:
        """Rows of the named read-only statement in sql/queries.sql (status and report)."""
        with self._read() as conn:
            return list(self._run(conn, name, params))

    def scalar(self, name: str, params: dict[str, Any] | None = None) -> Any:
        """The single value of a named read-only statement."""
        with self._read() as conn:
            return self._run(conn, name, params).scalar()

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


class _SqliteResult:
    """What the write path reads from a statement (first, one, scalar, rowcount, lastrowid, rows
    with attributes), fetched at once from a sqlite3 cursor so that the statement is finished."""

    def __init__(self, cursor: sqlite3.Cursor):
        names = tuple(column[0] for column in cursor.description or ())
        data = cursor.fetchall() if names else []
        self.rowcount = cursor.rowcount
        self.lastrowid = cursor.lastrowid
        row = _row_type(names) if names else tuple
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
def _row_type(names: tuple[str, ...]) -> Any:
    return namedtuple("Row", names, rename=True)


def _sqlite3(conn: Connection) -> sqlite3.Connection:
    """The sqlite3 connection under a SQLAlchemy one (the write path talks to it directly)."""
    driver = conn.connection.driver_connection
    assert isinstance(driver, sqlite3.Connection)
    return driver


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


def _split_sql(script: str) -> list[str]:
    """Statements of a migration file (no semicolons inside strings or bodies in our schema)."""
    body = "\n".join(line.split("--", 1)[0] for line in script.splitlines())
    return [statement.strip() for statement in body.split(";") if statement.strip()]
