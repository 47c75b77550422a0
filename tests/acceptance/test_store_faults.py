"""The database in trouble, through the CLI: a process stopped inside a write transaction, and a
finished sweep's folder that can only be read."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from tests.conftest import Project, subprocess_env

STOPPED_INSIDE_A_WRITE = textwrap.dedent("""
    import os, signal, sys
    from hparray.store import Store
    store = Store.open(sys.argv[1], create=False)
    with store._write():
        print("inside", flush=True)
        os.kill(os.getpid(), signal.SIGSTOP)
""")


def test_status_ends_within_the_busy_timeout_while_a_writer_is_stopped(make_project) -> None:
    project: Project = make_project()
    assert project.run("plan", "--search", "lr").returncode == 0
    holder = subprocess.Popen([sys.executable, "-c", STOPPED_INSIDE_A_WRITE, str(project.db)],
                              stdout=subprocess.PIPE, text=True, env=subprocess_env())
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "inside"
        env = {"HPARRAY_SQLITE_BUSY_TIMEOUT_S": "2"}
        status = project.run("status", env=env, timeout=120)  # hung forever before: a bounded wait is the test
        reap = project.run("reap", env=env, timeout=120)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert status.returncode == 0, status.stdout + status.stderr
    assert "stayed locked by another process for over 2 s" in " ".join(status.stdout.split())
    assert "search: lr" in status.stdout  # what could be read is still shown
    lines = [line for line in reap.stderr.splitlines() if line.strip()]
    assert reap.returncode != 0 and len(lines) == 1 and "stayed locked" in lines[0], reap.stderr


def _read_only_argv(argv: list[str]) -> list[str]:
    """As root every file is writable: drop the capabilities that let root ignore permissions."""
    if os.geteuid() != 0:
        return argv
    if shutil.which("setpriv") is None:
        pytest.skip("running as root and setpriv (util-linux) is missing: cannot make a folder read-only")
    return ["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner,-linux_immutable", *argv]


def _freeze(folder: Path) -> None:
    for path in [folder, *folder.rglob("*")]:
        mode = path.lstat().st_mode
        if not stat.S_ISLNK(mode):
            path.chmod(stat.S_IMODE(mode) & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


def _thaw(folder: Path) -> None:
    for path in [folder, *folder.rglob("*")]:
        if not path.is_symlink():
            path.chmod(stat.S_IMODE(path.lstat().st_mode) | stat.S_IWUSR)


@pytest.mark.slow
def test_status_and_report_work_on_a_read_only_copy_of_a_finished_sweep(make_project) -> None:
    project: Project = make_project(per_category=1, lr_values=[1e-5, 1e-4])
    assert project.run("plan", "--search", "lr").returncode == 0
    ran = project.run("submit", "--local", "--workers", "1", timeout=600)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    base = Path(tempfile.mkdtemp(prefix="hparray-ro-"))
    copy, out = base / "sweep", base / "report"
    try:
        shutil.copytree(project.root, copy, symlinks=True)
        out.mkdir()
        _freeze(copy)
        before = (copy / "results.db").read_bytes()
        files_before = sorted(p.name for p in copy.iterdir())
        env = subprocess_env({"HPARRAY_CACHE": str(base / "cache")})

        def hparray(*argv: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(_read_only_argv([sys.executable, "-m", "hparray", *argv]), cwd=copy, env=env,
                                  capture_output=True, text=True, timeout=300)

        probe = subprocess.run(_read_only_argv(["sh", "-c", f"echo x >> '{copy}/results.db'"]), capture_output=True)
        assert probe.returncode != 0, "the copy is still writable: the test would prove nothing"
        status = hparray("status", "--json")
        assert status.returncode == 0, status.stderr
        state = json.loads(status.stdout)
        assert (state["total"], state["done"]) == (6, 6) and "read-only" in state["reap_problem"]
        report = hparray("report", "--out", str(out))
        assert report.returncode == 0, report.stdout + report.stderr
        assert json.loads((out / "summary.json").read_text())["searches"]
        assert (out / "report.html").is_file()
        assert (copy / "results.db").read_bytes() == before
        assert sorted(p.name for p in copy.iterdir()) == files_before, "a file appeared in the read-only copy"
    finally:
        _thaw(base)
        shutil.rmtree(base, ignore_errors=True)
