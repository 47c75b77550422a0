"""SQLite specifics: the engine, the journal mode, a read-only opening, and the writer lock.

WAL on a local disk, the rollback journal where WAL's shared memory cannot work (network
filesystems); `BEGIN IMMEDIATE` for writers; a busy timeout that bounds every wait, the writer
lock's included.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.pool import QueuePool

from hparray.environment import NETWORK_FILESYSTEMS

log = logging.getLogger(__name__)

# 64 workers queueing behind one writer each holding the lock for ~1 ms never get near this;
# it only has to outlast a slow checkpoint or a stalled NFS lock server.
SQLITE_BUSY_TIMEOUT_S = float(os.environ.get("HPARRAY_SQLITE_BUSY_TIMEOUT_S", "60"))
HAS_RETURNING = sqlite3.sqlite_version_info >= (3, 35, 0)


def is_readonly(path: Path) -> bool:
    """A database this process may not write: a read-only mount, a copy without write permission."""
    return path.exists() and not (os.access(path, os.W_OK) and os.access(path.parent, os.W_OK))


def sqlite_engine(path: Path, readonly: bool) -> Engine:
    """An engine for one SQLite file: pooled connections, our own transaction control.

    A pooled connection per thread, kept between transactions. A connection per transaction
    (NullPool) cost an open() and three PRAGMAs every time and, in WAL mode, a checkpoint and
    deletion of the WAL file whenever the last connection closed: 30-40 ms per claim in one
    process. An idle connection holds no lock; a forked child never reuses its parent's
    connections (the store refuses them). Two connections cover the worker's main and heartbeat
    threads; pysqlite lets a pooled file connection move between threads.

    A read-only file is opened with mode=ro; WAL needs its -shm file, which a folder that cannot
    be written cannot hold, so then the file is read as immutable.
    """
    url = f"sqlite:///{path}"
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
        driver(conn).execute(mode)  # straight to sqlite3, as the store's write path

    return engine


def driver(conn: Connection) -> sqlite3.Connection:
    """The sqlite3 connection under a SQLAlchemy one (the write path talks to it directly)."""
    raw = conn.connection.driver_connection
    assert isinstance(raw, sqlite3.Connection)
    return raw


def pragma(engine: Engine, name: str, value: str | None = None) -> str:
    """Read a PRAGMA, or set it when it differs from `value`; returns what it is now."""
    raw = engine.raw_connection()
    try:
        cursor = raw.cursor()
        current = str(cursor.execute(f"PRAGMA {name}").fetchone()[0])
        if value is not None and current != value:
            current = str(cursor.execute(f"PRAGMA {name} = {value}").fetchone()[0])
        return current
    finally:
        raw.close()


def wanted_journal_mode(filesystem: str) -> str:
    """WAL on a local disk; the rollback journal on a network filesystem (HPARRAY_SQLITE_JOURNAL wins)."""
    wanted = "delete" if filesystem in NETWORK_FILESYSTEMS else "wal"
    return os.environ.get("HPARRAY_SQLITE_JOURNAL", wanted).lower()


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

