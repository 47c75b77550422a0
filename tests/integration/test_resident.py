"""The resident runner with a real server in a separate venv that has neither torch nor hparray
(nor numpy): a sweep, a crash mid-task, a per-task timeout, SIGUSR1, SIGKILL of the worker, a
wrong hello, a malformed reply, and what a request carries (never the video's path; exactly
condition_frames frames). Then the tiny LTX-Video through the shipped resident example gives the
in-process `ltx` runner's results exactly."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import time
import venv
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Project

SERVER = Path(__file__).resolve().parents[1] / "support" / "servers" / "plain_server.py"
OLDEST_PYTHONS = ("/root/.pyenv/versions/3.8.18/bin/python3.8", "python3.8", "python3.9")


@pytest.fixture(scope="session")
def bare_python(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The interpreter of a fresh venv with nothing installed, on the oldest Python at hand (the
    helper promises 3.8)."""
    base = next((found for found in (name if os.path.isfile(name) else shutil.which(name)
                                     for name in OLDEST_PYTHONS) if found), None)
    folder = tmp_path_factory.mktemp("bare-venv")
    if base is not None:
        subprocess.run([base, "-m", "venv", "--without-pip", str(folder)], check=True, capture_output=True)
    else:
        venv.create(folder, with_pip=False)
    python = str(folder / "bin" / "python")
    for module in ("numpy", "torch", "hparray"):
        clean = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        probe = subprocess.run([python, "-c", f"import {module}"], capture_output=True, cwd=folder, env=clean)
        assert probe.returncode != 0, f"the bare venv can import {module}"
    return python


def resident_project(make_project: Callable[..., Project], tmp_path: Path, python: str, mode: str = "ok",
                     **overrides: Any) -> Project:
    project = make_project(lr_values=[1e-5, 1e-4], per_category=1, **{
        "runner": {"name": "resident", "command": [python, str(SERVER)], "timeout_s": 600, "start_timeout_s": 120},
        "metrics": ["psnr", "ssim"], **overrides})
    record = tmp_path / f"record-{project.root.name}"
    record.mkdir()
    project.env.update({"TEST_SERVER_MODE": mode, "TEST_SERVER_RECORD": str(record),
                        "TEST_SERVER_HOLD": str(tmp_path / f"go-{project.root.name}")})
    return project


def record_of(project: Project) -> Path:
    return Path(project.env["TEST_SERVER_RECORD"])


def requests(project: Project) -> list[dict[str, Any]]:
    folder = record_of(project)
    return [json.loads((folder / name).read_text()) for name in sorted(os.listdir(folder))
            if name.startswith("request-")]


def server_pids(project: Project) -> set[int]:
    return {int(name[4:]) for name in os.listdir(record_of(project)) if name.startswith("pid-")}


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as fh:
            return not any(line.startswith("State:") and "Z" in line.split()[1] for line in fh)
    except FileNotFoundError:
        return False


def wait_for(what: str, check: Callable[[], Any], timeout_s: float = 120) -> Any:
    deadline = time.monotonic() + timeout_s
    while not (value := check()):
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.05)
    return value


def db_rows(project: Project, sql: str) -> list[tuple[Any, ...]]:
    with sqlite3.connect(project.db) as conn:
        return conn.execute(sql).fetchall()


def plan(project: Project) -> None:
    planned = project.run("plan", "--search", "lr")
    assert planned.returncode == 0, planned.stdout + planned.stderr


def test_a_sweep_through_a_server_in_its_own_venv(make_project, tmp_path: Path, bare_python: str) -> None:
    project = resident_project(make_project, tmp_path, bare_python)
    plan(project)
    assert "plain-server:v1" in project.run("plan", "--search", "lr", "--dry-run").stdout  # the hello's model
    ran = project.run("submit", "--local", "--workers", "1", timeout=600)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert db_rows(project, "SELECT status, COUNT(*) FROM tasks GROUP BY status") == [("done", 6)]
    seen = requests(project)
    assert len(seen) == 6 and len({entry["pid"] for entry in seen}) == 1  # one server for every row
    video_paths = [str(p) for p in (project.root / "videos").rglob("*.npy")]
    for entry in seen:
        request = entry["request"]
        assert not any(path in json.dumps(request) for path in video_paths), "a request named the video's file"
        assert entry["condition_shape"] == [request["condition_frames"], 32, 32, 3]
        assert request["num_frames"] == 12 and request["fps"] == 25
    assert json.loads(db_rows(project, "SELECT details FROM results LIMIT 1")[0][0])["server_python"].startswith("3.")


def test_a_crash_mid_task_retries_the_row_on_a_fresh_server(make_project, tmp_path: Path, bare_python: str) -> None:
    project = resident_project(make_project, tmp_path, bare_python, mode="crash-once")
    plan(project)
    ran = project.run("submit", "--local", "--workers", "1", timeout=600)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert db_rows(project, "SELECT status, COUNT(*) FROM tasks GROUP BY status") == [("done", 6)]
    errors = db_rows(project, "SELECT error FROM attempts WHERE outcome = 'error'")
    assert len(errors) == 1 and "server exited" in errors[0][0] and "about to crash on purpose" in errors[0][0]
    assert len({entry["pid"] for entry in requests(project)}) == 2  # restarted before the next claim


def test_a_task_past_its_timeout_kills_the_server_and_errors(make_project, tmp_path: Path, bare_python: str) -> None:
    project = resident_project(make_project, tmp_path, bare_python, mode="hang-once")
    base = project.base()
    base["runner"]["timeout_s"] = 10
    project.write_base(base)
    plan(project)
    ran = project.run("submit", "--local", "--workers", "1", timeout=600)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    errors = db_rows(project, "SELECT error FROM attempts WHERE outcome = 'error'")
    assert len(errors) == 1 and "took longer than runner.timeout_s = 10 s" in errors[0][0], errors
    assert "hanging on purpose" in errors[0][0]
    assert db_rows(project, "SELECT status, COUNT(*) FROM tasks GROUP BY status") == [("done", 6)]
    assert not any(alive(pid) for pid in server_pids(project))


@pytest.mark.parametrize("signame", ["SIGUSR1", "SIGTERM", "SIGKILL"])
def test_a_signalled_worker_leaves_no_server_behind(make_project, tmp_path: Path, bare_python: str,
                                                   signame: str) -> None:
    """SIGUSR1 (Slurm's warning, the row not fitting in the grace) and SIGTERM: the worker gives its
    row back and its server is killed. SIGKILL: the guard sees its worker die and takes the server
    (and its group) with it."""
    project = resident_project(make_project, tmp_path, bare_python, mode="hold", **{"slurm.signal_grace_s": 1})
    plan(project)
    worker = project.popen("worker", stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for("the server to receive a task", lambda: requests(project))
        pids = {entry["pid"] for entry in requests(project)}
        assert len(pids) == 1 and all(alive(pid) for pid in pids)
        worker.send_signal(getattr(signal, signame))
        worker.wait(timeout=120)
        wait_for("the server to be gone", lambda: not any(alive(pid) for pid in pids), 60)
    finally:
        if worker.poll() is None:
            worker.kill()
    if signame != "SIGKILL":
        assert worker.returncode == 0
        assert db_rows(project, "SELECT outcome FROM attempts") == [("released",)]
        assert db_rows(project, "SELECT COUNT(*) FROM tasks WHERE status = 'pending'") == [(6,)]


def test_a_wrong_hello_is_one_clear_error_before_anything_is_claimed(make_project, tmp_path: Path,
                                                                    bare_python: str) -> None:
    project = resident_project(make_project, tmp_path, bare_python)
    plan(project)
    project.env["TEST_SERVER_MODE"] = "bad-hello"
    for argv, code in ((["plan", "--search", "lr"], 2), (["worker"], 3)):
        result = project.run(*argv, timeout=300)
        lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert result.returncode == code, result.stdout + result.stderr
        assert len(lines) == 1 and "protocol 99" in lines[0], result.stderr
    assert db_rows(project, "SELECT COUNT(*) FROM attempts") == [(0,)]


def test_a_malformed_reply_is_one_clear_error(make_project, tmp_path: Path, bare_python: str) -> None:
    project = resident_project(make_project, tmp_path, bare_python, mode="malformed",
                               **{"tasks": {"max_attempts": 1, "circuit_breaker": 0}})
    plan(project)
    result = project.run("worker", "--max-tasks", "1", timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    errors = db_rows(project, "SELECT error FROM attempts WHERE outcome = 'error'")
    assert len(errors) == 1 and "'this is not a protocol message'" in errors[0][0]
    assert "not a protocol message: print to stderr, not stdout" in errors[0][0]


@pytest.mark.slow
def test_the_tiny_ltx_through_the_resident_example_equals_the_in_process_runner(make_project) -> None:
    """Same rows, same seeds: the metrics are bit-identical (the frames travel as float32 .npy)."""
    model = {"inference_steps": 2}
    results = []
    for runner in ({"name": "ltx"},
                   {"name": "resident", "command": ["{python}", "{servers}/tiny_ltx.py", "--inference-steps", "2"]}):
        project = make_project(lr_values=[1e-5], per_category=1, frames=17, folder=f"sweep-{runner['name']}", **{
            "runner": runner, "model": model, "metrics": ["psnr", "ssim"], "data.num_frames": 17,
            "data.height": 32, "data.width": 32, "baseline": {"lr": 1e-4, "condition_frames": 9, "finetune_steps": 2}})
        plan(project)
        ran = project.run("submit", "--local", "--workers", "1", timeout=900)
        assert ran.returncode == 0, ran.stdout + ran.stderr
        results.append(db_rows(project, "SELECT t.kind, t.video, r.psnr, r.ssim FROM results AS r "
                                        "JOIN tasks AS t ON t.id = r.task_id ORDER BY t.kind, t.video"))
    assert len(results[0]) == 4 and results[0] == results[1]
