"""A real, throw-away PostgreSQL server for the tests: initdb into a temp folder, pg_ctl start on
a free 127.0.0.1 port, one fresh database per test, pg_ctl stop + rm at the end.

PostgreSQL refuses to run as root, so as root the server runs as the system user `hparray-pg`
(created on first use). Durability is switched off: the data is thrown away anyway, and fsync on
a loaded CI disk would dominate the run time.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PG_USER = "hparray-pg"  # the OS account that owns the data folder when tests run as root
SUPERUSER = "hparray"  # the database role initdb creates; trust auth on 127.0.0.1 only
START_TIMEOUT_S = 60


class PostgresUnavailable(Exception):
    """No usable PostgreSQL here; the message says why (tests skip with it)."""


def find_bin_dir() -> Path | None:
    """The folder holding initdb/pg_ctl: PATH first, then the newest Debian /usr/lib/postgresql/N/bin."""
    on_path = shutil.which("initdb")
    if on_path and shutil.which("pg_ctl"):
        return Path(on_path).resolve().parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                        key=lambda p: int(Path(p).parent.parent.name) if Path(p).parent.parent.name.isdigit() else 0)
    return Path(candidates[-1]).parent if candidates else None


def install_postgres() -> str:
    """apt-get install postgresql as root; returns '' on success, else why not."""
    if os.geteuid() != 0:
        return "PostgreSQL binaries (initdb, pg_ctl) not found and not root, so cannot apt-get install postgresql"
    if shutil.which("apt-get") is None:
        return "PostgreSQL binaries (initdb, pg_ctl) not found and no apt-get to install them"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "postgresql"]
    for attempt in range(2):
        if attempt:
            subprocess.run(["apt-get", "update", "-q"], capture_output=True, env=env, timeout=600)
        done = subprocess.run(install, capture_output=True, text=True, env=env, timeout=900)
        if done.returncode == 0 and find_bin_dir() is not None:
            return ""
    return f"apt-get install postgresql failed: {done.stderr.strip()[-300:]}"


def _service_account() -> pwd.struct_passwd:
    """The unprivileged account PostgreSQL runs as when we are root (created with useradd -r)."""
    try:
        return pwd.getpwnam(PG_USER)
    except KeyError:
        made = subprocess.run(["useradd", "-r", "-M", "-d", "/nonexistent", "-s", "/usr/sbin/nologin", PG_USER],
                              capture_output=True, text=True)
        try:
            return pwd.getpwnam(PG_USER)
        except KeyError:  # lost a race with another test run creating it? Then it exists; else say why
            raise PostgresUnavailable(f"useradd {PG_USER} failed: {made.stderr.strip()}") from None


def free_port() -> int:
    """A port nothing listens on right now (the server retries with another if it loses a race)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class PostgresServer:
    """One running server; `database()` hands out fresh, empty databases."""

    bin_dir: Path
    root: Path
    port: int = 0
    account: pwd.struct_passwd | None = None

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    def _run(self, *args: str, timeout: float = START_TIMEOUT_S) -> subprocess.CompletedProcess:
        """A PostgreSQL tool as the owning account (root is refused by initdb and postgres)."""
        kwargs: dict[str, Any] = {}
        if self.account is not None:
            kwargs = {"user": self.account.pw_uid, "group": self.account.pw_gid, "extra_groups": []}
        return subprocess.run([str(self.bin_dir / args[0]), *args[1:]], capture_output=True, text=True,
                              timeout=timeout, cwd=self.root, env={"PATH": os.environ.get("PATH", ""),
                                                                    "LC_ALL": "C", "LANG": "C"}, **kwargs)

    @classmethod
    def start(cls) -> PostgresServer:
        bin_dir = find_bin_dir()
        if bin_dir is None:
            why = install_postgres()
            if why:
                raise PostgresUnavailable(why)
            bin_dir = find_bin_dir()
            assert bin_dir is not None
        account = _service_account() if os.geteuid() == 0 else None
        root = Path(tempfile.mkdtemp(prefix="hparray-pg-"))
        server = cls(bin_dir=bin_dir, root=root, account=account)
        try:
            if account is not None:
                os.chown(root, account.pw_uid, account.pw_gid)
            init = server._run("initdb", "-D", str(server.data_dir), "-U", SUPERUSER, "-A", "trust", "-E", "UTF8",
                               "--no-locale", "--no-sync")
            if init.returncode != 0:
                raise PostgresUnavailable(f"initdb failed: {init.stderr.strip()[-500:]}")
            server._start_on_free_port()
        except BaseException:
            server.remove()
            raise
        return server

    def _start_on_free_port(self) -> None:
        log = self.root / "server.log"
        for _ in range(3):
            self.port = free_port()
            options = " ".join([
                "-c listen_addresses=127.0.0.1", f"-c port={self.port}", f"-c unix_socket_directories={self.root}",
                "-c fsync=off", "-c synchronous_commit=off", "-c full_page_writes=off",
                "-c max_connections=300", "-c shared_buffers=32MB", "-c max_wal_size=1GB",
            ])
            started = self._run("pg_ctl", "start", "-w", "-t", str(START_TIMEOUT_S), "-D", str(self.data_dir),
                                "-l", str(log), "-o", options, timeout=START_TIMEOUT_S + 10)
            if started.returncode == 0:
                return
            text = log.read_text(errors="replace") if log.exists() else started.stderr
            if "Address already in use" not in text and "could not bind" not in text:
                raise PostgresUnavailable(f"pg_ctl start failed: {(started.stderr + text).strip()[-800:]}")
        raise PostgresUnavailable("pg_ctl start: no free port after 3 tries")

    def admin_url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def _admin(self, statement: str) -> None:
        import psycopg

        with psycopg.connect(host="127.0.0.1", port=self.port, user=SUPERUSER, dbname="postgres",
                             autocommit=True, connect_timeout=30) as conn:
            conn.execute(statement)

    def database(self) -> str:
        """A new empty database's SQLAlchemy URL (CREATE DATABASE from template1 takes milliseconds)."""
        name = f"t_{uuid.uuid4().hex[:12]}"
        self._admin(f'CREATE DATABASE "{name}"')
        return self.admin_url(name)

    def drop(self, url: str) -> None:
        """Drop a database from `database()`, closing whatever a test left connected to it."""
        name = url.rsplit("/", 1)[1]
        self._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def stop(self) -> None:
        if self.data_dir.exists():
            self._run("pg_ctl", "stop", "-m", "fast", "-w", "-D", str(self.data_dir))
        self.remove()

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

