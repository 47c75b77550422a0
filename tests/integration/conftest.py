"""A real single-node Slurm 22.05 cluster for the `slurm` tests, started once per session.

tests/slurm/start-local-slurm.sh brings up munged + slurmctld + slurmd with fake GPUs under a
fresh folder in /tmp, on free ports, without touching /etc/slurm (other test runs on the same
machine may have their own cluster); the fixture points SLURM_CONF at it and wipes it at the end.
Without root, or without slurmctld and apt to install it, the tests skip and say why.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from hparray.store import Store

SLURM_SCRIPTS = Path(__file__).resolve().parent.parent / "slurm"
GPUS = 2
CPUS = 4


@dataclass(frozen=True)
class LocalSlurm:
    base: Path
    conf: Path
    gpus: int

    def command(self, *argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """A Slurm client command against this cluster."""
        return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "SLURM_CONF": str(self.conf)})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _unavailable() -> str | None:
    """Why no cluster can be started here, or None."""
    if os.geteuid() != 0:
        return "the local Slurm cluster needs root (munged runs as user munge, slurmd as root)"
    if shutil.which("slurmctld") is None and shutil.which("apt-get") is None:
        return "slurmctld is not installed and there is no apt-get to install it (`make system-deps`)"
    return None


@pytest.fixture(scope="session")
def local_slurm() -> Iterator[LocalSlurm]:
    """Start the cluster (installing the Debian packages if missing), yield it, stop and wipe it."""
    reason = _unavailable()
    if reason:
        pytest.skip(reason)
    base = Path(tempfile.mkdtemp(prefix="hparray-slurm-", dir="/tmp"))
    env = {**os.environ, "LOCAL_SLURM_BASE": str(base), "LOCAL_SLURM_ACCOUNTING": "0",
           "LOCAL_SLURM_GPUS": str(GPUS), "LOCAL_SLURM_CPUS": str(CPUS), "LOCAL_SLURM_LINK_ETC": "0",
           "LOCAL_SLURM_CTLD_PORT": str(_free_port()), "LOCAL_SLURM_SLURMD_PORT": str(_free_port()),
           "LOCAL_SLURM_TIMEOUT": "90"}
    started = subprocess.run(["bash", str(SLURM_SCRIPTS / "start-local-slurm.sh")], capture_output=True,
                             text=True, env=env, timeout=600)
    if started.returncode != 0:
        subprocess.run(["bash", str(SLURM_SCRIPTS / "stop-local-slurm.sh"), "--wipe"], capture_output=True,
                       env=env, timeout=180)
        shutil.rmtree(base, ignore_errors=True)
        if shutil.which("slurmctld") is None:
            pytest.skip(f"slurmctld is not installed and could not be installed: {started.stderr.strip()[-300:]}")
        pytest.fail(f"the local Slurm cluster did not start:\n{started.stderr[-3000:]}")
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(base / "etc" / "slurm.conf")
    try:
        yield LocalSlurm(base=base, conf=base / "etc" / "slurm.conf", gpus=GPUS)
    finally:
        if previous is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = previous
        subprocess.run(["bash", str(SLURM_SCRIPTS / "stop-local-slurm.sh"), "--wipe"], capture_output=True,
                       env=env, timeout=180)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    """An opened store on each database the test is parametrised over (`db_url`: SQLite, PostgreSQL)."""
    opened = Store.open(db_url)
    yield opened
    opened.close()
