"""`hparray submit` on a REAL Slurm (tests/integration/conftest.py starts it): job arrays of workers
on fake GPUs, scancel and killed workers mid-task, Slurm's USR1 warning, `hparray cancel`.

Workers run the test runner (tests.support.runners:SleepyRunner): tasks hold until the test lets them
go (HPARRAY_TEST_HOLD: a `go` file, or one `ticket-*` per task), so a worker is certainly mid-task
when a test signals it, and HPARRAY_TEST_MARK_DIR records every task start. sbatch exports the submitting
environment (--export=ALL, the default), so both, and the PYTHONPATH that makes `tests` importable,
reach the array tasks. The heartbeat grace is an hour here, so a row that comes back came back
through Slurm (the worker's own release, or the Slurm-aware reaper), never through the grace;
the attempt's outcome and reason say which.
"""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from hparray.cli import cli
from tests.conftest import Project
from tests.integration.conftest import LocalSlurm

pytestmark = pytest.mark.slurm

GRACE_S = 3600
SIGNAL_GRACE_S = 20


@pytest.fixture(autouse=True)
def _no_jobs_left_behind(local_slurm: LocalSlurm) -> Iterator[None]:
    """A failed test's held workers would occupy the fake GPUs and starve every test after it."""
    yield
    local_slurm.command("scancel", "--user", os.environ.get("USER", "root"), "--full")
    wait_for("the cluster to be empty", lambda: not local_slurm.command("squeue", "-h").stdout.strip(), 120)


def slurm_project(make_project: Callable[..., Project], tmp_path: Path, estimate_s: float = 3.0,
                  folder: str | None = None, **env: str) -> Project:
    """8 rows (4 videos: baseline inference + one fine-tune config), small Slurm requests; planned
    in this process (seconds saved on a busy machine: the plan is not what these tests are about)."""
    project = make_project(lr_values=[1e-5], per_category=2, folder=folder, **{
        "slurm.mem_gb": 1, "slurm.cpus_per_task": 1, "slurm.time": "10:00", "slurm.gpus_per_task": 1,
        "slurm.workers": 2, "slurm.throttle": 2, "slurm.signal_grace_s": SIGNAL_GRACE_S,
        "tasks.heartbeat_interval_s": 1, "tasks.heartbeat_grace_s": GRACE_S,
        "tasks.gpu_minutes_per_task": estimate_s / 60, "tasks.baseline_gpu_minutes": estimate_s / 60})
    marks, hold = tmp_path / f"marks-{project.root.name}", tmp_path / f"hold-{project.root.name}"
    marks.mkdir()
    hold.mkdir()
    project.env.update({"HPARRAY_TEST_HOLD": str(hold), "HPARRAY_TEST_MARK_DIR": str(marks), **env})
    here = os.getcwd()
    os.chdir(project.root)  # data.source is relative to the project folder
    try:
        planned = CliRunner().invoke(cli, ["--config-dir", str(project.config_dir), "--db", str(project.db),
                                           "plan", "--search", "lr"])
    finally:
        os.chdir(here)
    assert planned.exit_code == 0, planned.output
    return project


def query(project: Project, sql: str, *params: Any) -> list[sqlite3.Row]:
    with sqlite3.connect(f"file:{project.db}?mode=ro", uri=True, timeout=30) as conn:
        conn.row_factory = sqlite3.Row
        return conn.execute(sql, params).fetchall()


def counts(project: Project) -> Counter[str]:
    return Counter({row["status"]: row["n"] for row in query(project, "SELECT status, COUNT(*) AS n FROM tasks "
                                                                      "GROUP BY status")})


def wait_for(what: str, check: Callable[[], Any], timeout: float, every: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


def submit(project: Project, *args: str) -> str:
    """`hparray submit` on Slurm; returns the job id it printed."""
    result = project.run("submit", *args)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "hparray status" in result.stdout
    return re.search(r"submitted job (\d+)", result.stdout).group(1)  # type: ignore[union-attr]


def job_states(local_slurm: LocalSlurm, job: str) -> dict[str, str]:
    out = local_slurm.command("squeue", "-h", "-r", "-j", job, "-o", "%i|%T").stdout
    return dict(line.split("|", 1) for line in out.split())


def job_ended(local_slurm: LocalSlurm, job: str) -> bool:
    return not any(state in ("RUNNING", "PENDING", "COMPLETING", "CONFIGURING")
                   for state in job_states(local_slurm, job).values())


def let_go(project: Project, tickets: int | None = None) -> None:
    """Let every task run (`go`), or `tickets` more tasks."""
    folder = Path(project.env["HPARRAY_TEST_HOLD"])
    if tickets is None:
        (folder / "go").touch()
    for _ in range(tickets or 0):
        (folder / f"ticket-{time.time_ns()}").touch()


def marks(project: Project) -> Counter[tuple[str, str]]:
    """Task starts per (kind, video), from HPARRAY_TEST_MARK_DIR."""
    folder = Path(project.env["HPARRAY_TEST_MARK_DIR"])
    return Counter((name.split("-")[0], name.split("-")[1]) for name in os.listdir(folder))


# ---------------------------------------------------------------- a sweep on Slurm


def test_dry_run_then_an_array_on_fake_gpus_runs_the_sweep(local_slurm: LocalSlurm, make_project,
                                                           tmp_path: Path) -> None:
    project = slurm_project(make_project, tmp_path)
    dry = project.run("submit", "--dry-run", "--gpus", "1", "--throttle", "2")
    assert dry.returncode == 0, dry.stdout + dry.stderr
    logs = project.root / "logs" / "slurm"
    for expected in ("#SBATCH --array=0-1%2", "#SBATCH --gres=gpu:1", f"#SBATCH --signal=B:USR1@{SIGNAL_GRACE_S}",
                     f'#SBATCH --output="{logs}/%x_%A_%a.out"', f'#SBATCH --error="{logs}/%x_%A_%a.err"',
                     "sbatch command: sbatch --parsable", "2 workers for 8 claimable rows", "nothing submitted"):
        assert expected in dry.stdout
    assert not logs.exists() and not query(project, "SELECT * FROM submissions")

    job = submit(project, "--gpus", "1", "--throttle", "2")
    assert [row["job_id"] for row in query(project, "SELECT job_id FROM submissions")] == [job]
    wait_for("a worker to register", lambda: query(project, "SELECT id FROM workers WHERE state = 'running'"), 90)
    status = project.run("status")
    assert status.returncode == 0, status.stderr
    assert re.search(rf"\b{job}_[01]\b", status.stdout) and "slurm jobs" in status.stdout

    let_go(project)  # the tasks held until now, so the workers were seen running
    wait_for("every row done", lambda: counts(project)["done"] == 8, 150)
    workers = query(project, "SELECT gpu, slurm_array_job_id, slurm_array_task_id FROM workers")
    assert {w["slurm_array_job_id"] for w in workers} == {job}
    assert sorted(w["slurm_array_task_id"] for w in workers) == ["0", "1"]
    # Both tasks ran at once with one GPU each: Slurm gave them different devices.
    assert sorted(w["gpu"] for w in workers) == ["0", "1"]
    again = project.run("submit")
    assert "nothing to submit" in again.stdout and len(query(project, "SELECT * FROM submissions")) == 1


def test_scancelled_and_killed_array_tasks_give_rows_back_and_resubmit_finishes_the_rest(
        local_slurm: LocalSlurm, make_project, tmp_path: Path) -> None:
    project = slurm_project(make_project, tmp_path)
    let_go(project, tickets=1)  # one row finishes; every task after it holds
    job = submit(project)

    def both_busy() -> dict[str, sqlite3.Row] | None:
        rows = query(project, "SELECT t.id, t.worker_id, w.pid, w.slurm_array_task_id AS idx FROM tasks AS t "
                              "JOIN workers AS w ON w.id = t.worker_id WHERE t.status = 'running'")
        return {row["idx"]: row for row in rows} if len(rows) == 2 and counts(project)["done"] >= 1 else None

    busy = wait_for("one row done and both workers mid-task", both_busy, 120, every=0.2)

    # scancel of array task 0: Slurm TERMs it, its worker puts the row back without spending the attempt.
    assert local_slurm.command("scancel", f"{job}_0").returncode == 0
    row0 = busy["0"]["id"]
    outcome0 = wait_for("task 0's attempt to end", lambda: query(
        project, "SELECT outcome FROM attempts WHERE task_id = ? AND worker_id = ? AND outcome IS NOT NULL",
        row0, busy["0"]["worker_id"]), 120)
    assert outcome0[0]["outcome"] in ("released", "reaped")  # the grace is an hour: this came through Slurm
    out0 = project.root / "logs" / "slurm" / f"hparray_{job}_0.out"
    wait_for("task 0's batch script to end", lambda: "worker exited with status" in out0.read_text(), 120)
    assert "worker exited with status 0" in out0.read_text()  # slurmstepd's TERM and the script's: still 0

    # Array task 1's worker dies without a word (as on OOM or a segfault): the batch script exits,
    # Slurm forgets the task, and the Slurm-aware reaper (`hparray reap`) puts the row back at once.
    os.kill(busy["1"]["pid"], signal.SIGKILL)
    held = query(project, "SELECT task_id FROM attempts WHERE worker_id = ? AND outcome IS NULL",
                 busy["1"]["worker_id"])
    assert len(held) == 1, "the killed worker should have died mid-task (its task was held)"
    row1 = held[0]["task_id"]
    wait_for("task 1 to leave Slurm", lambda: job_ended(local_slurm, job), 60)

    def reaped() -> list[sqlite3.Row]:
        assert project.run("reap").returncode == 0
        return query(project, "SELECT outcome, error FROM attempts WHERE task_id = ? AND worker_id = ? "
                              "AND outcome = 'reaped'", row1, busy["1"]["worker_id"])

    attempt = wait_for("the killed worker's row to be reaped", reaped, 120, every=1)
    assert "is gone" in attempt[0]["error"]  # Slurm's word, not the (hour-long) heartbeat grace
    assert counts(project)["running"] == 0

    done_before = {row["id"]: (row["attempt_id"], row["recorded_at"]) for row in query(
        project, "SELECT task_id AS id, attempt_id, recorded_at FROM results")}
    keys = {row["id"]: (row["kind"], row["video"]) for row in query(project, "SELECT id, kind, video FROM tasks")}
    marks_before = marks(project)
    assert 1 <= len(done_before) < 8

    let_go(project)
    job2 = submit(project)
    assert job2 != job
    wait_for("every row done after resubmitting", lambda: counts(project)["done"] == 8, 150)
    after = {row["id"]: (row["attempt_id"], row["recorded_at"]) for row in query(
        project, "SELECT task_id AS id, attempt_id, recorded_at FROM results")}
    assert {task: after[task] for task in done_before} == done_before  # first results kept
    new_starts = marks(project) - marks_before
    assert set(new_starts) == {keys[task] for task in keys if task not in done_before}  # exactly the rest
    assert not any(new_starts[keys[task]] for task in done_before)  # nothing done ran again
    finished_by = {row["task_id"]: row["job"] for row in query(
        project, "SELECT r.task_id, w.slurm_array_job_id AS job FROM results AS r "
                 "JOIN attempts AS a ON a.id = r.attempt_id JOIN workers AS w ON w.id = a.worker_id")}
    assert {finished_by[task] for task in finished_by if task not in done_before} == {job2}


@pytest.mark.parametrize("case", ["finish", "release"])
def test_usr1_warning_finishes_or_releases_within_the_grace(local_slurm: LocalSlurm, make_project, tmp_path: Path,
                                                           case: str) -> None:
    # finish: a task expected to take 4 s fits in 0.8 x 20 s; release: one expected to take 60 s does not.
    project = slurm_project(make_project, tmp_path, estimate_s=4.0 if case == "finish" else 60.0)
    job = submit(project, "--workers", "1")
    row = wait_for("the worker to be mid-task", lambda: query(
        project, "SELECT id FROM tasks WHERE status = 'running'"), 120, every=0.2)[0]
    wait_for("its task to start", lambda: marks(project), 120, every=0.2)
    sent = local_slurm.command("scancel", "--batch", "--signal=USR1", f"{job}_0")
    assert sent.returncode == 0, sent.stderr
    err_log = project.root / "logs" / "slurm" / f"hparray_{job}_0.err"
    if case == "finish":  # the worker has decided to finish: let the held task complete
        wait_for("the worker to decide", lambda: err_log.exists() and "finishing it" in err_log.read_text(), 120)
        let_go(project, tickets=1)
    wait_for("the array task to end", lambda: job_ended(local_slurm, job), 180, every=0.3)

    attempt = query(project, "SELECT outcome FROM attempts WHERE task_id = ?", row["id"])
    task = query(project, "SELECT status, attempts FROM tasks WHERE id = ?", row["id"])[0]
    if case == "finish":
        assert [a["outcome"] for a in attempt] == ["done"] and task["status"] == "done"
        assert counts(project)["done"] == 1  # and it claimed nothing after the warning
    else:
        assert [a["outcome"] for a in attempt] == ["released"]
        assert (task["status"], task["attempts"]) == ("pending", 0)  # the attempt was given back
    assert counts(project)["running"] == 0
    out = (project.root / "logs" / "slurm" / f"hparray_{job}_0.out").read_text()
    err = (project.root / "logs" / "slurm" / f"hparray_{job}_0.err").read_text()
    assert "received SIGUSR1" in out and "worker exited with status 0" in out
    assert "stopped by SIGUSR1" in err


def test_cancel_stops_the_sweeps_jobs_and_puts_their_rows_back(local_slurm: LocalSlurm, make_project,
                                                              tmp_path: Path) -> None:
    project = slurm_project(make_project, tmp_path, estimate_s=60)
    job = submit(project)
    wait_for("both workers mid-task", lambda: counts(project)["running"] == 2, 120, every=0.3)
    cancelled = project.run("cancel")
    assert cancelled.returncode == 0, cancelled.stdout + cancelled.stderr
    assert f"cancelled job(s) {job}" in cancelled.stdout
    assert counts(project)["running"] == 0 and counts(project)["pending"] == 8
    assert [row["state"] for row in query(project, "SELECT state FROM submissions")] == ["cancelled"]
    assert job_ended(local_slurm, job)
    assert "no job of this sweep is queued or running" in project.run("cancel").stdout
    dry = project.run("submit", "--dry-run")
    assert "2 workers for 8 claimable rows" in dry.stdout


# ---------------------------------------------------------------- faults found on a real Slurm


def test_a_second_submit_counts_the_workers_already_queued_or_running(local_slurm: LocalSlurm, make_project,
                                                                      tmp_path: Path) -> None:
    project = slurm_project(make_project, tmp_path)
    job = submit(project, "--workers", "2")
    wait_for("both workers mid-task", lambda: counts(project)["running"] == 2, 120, every=0.3)
    again = project.run("submit", "--workers", "2")
    assert again.returncode == 0, again.stdout + again.stderr
    said = " ".join(again.stdout.split())
    assert "nothing submitted" in said and f"2 array tasks of this sweep ({job})" in said, said
    assert len(query(project, "SELECT * FROM submissions")) == 1
    more = project.run("submit", "--workers", "3", "--dry-run")  # asking for 3 in all adds one
    assert "would submit array 0-0%1: 1 workers" in " ".join(more.stdout.split()), more.stdout
    let_go(project)
    wait_for("every row done", lambda: counts(project)["done"] == 8, 150)


def test_a_project_folder_with_a_space_and_quotes_can_be_submitted(local_slurm: LocalSlurm, make_project,
                                                                   tmp_path: Path) -> None:
    project = slurm_project(make_project, tmp_path, folder="my sweep's \"best\" run")
    odd = project.root
    dry = project.run("submit", "--dry-run")
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert '#SBATCH --chdir="' + str(odd).replace('"', '\\"') + '"' in dry.stdout
    let_go(project)
    job = submit(project)
    wait_for("every row done", lambda: counts(project)["done"] == 8, 150)
    assert (odd / "logs" / "slurm" / f"hparray_{job}_0.out").is_file()


def test_usr1_while_the_model_loads_ends_the_array_task_cleanly(local_slurm: LocalSlurm, make_project,
                                                                tmp_path: Path) -> None:
    project = slurm_project(make_project, tmp_path)
    base = project.base()
    base["runner"] = {"name": "tests.support.runners:SlowLoadRunner"}
    project.write_base(base)
    job = submit(project, "--workers", "1")
    marks_dir = Path(project.env["HPARRAY_TEST_MARK_DIR"])
    wait_for("the model to be loading", lambda: (marks_dir / "loading").exists(), 120, every=0.2)
    sent = local_slurm.command("scancel", "--batch", "--signal=USR1", f"{job}_0")
    assert sent.returncode == 0, sent.stderr
    wait_for("the array task to end", lambda: job_ended(local_slurm, job), 120, every=0.3)
    out = (project.root / "logs" / "slurm" / f"hparray_{job}_0.out").read_text()
    assert "worker exited with status 0" in out, out
    assert query(project, "SELECT COUNT(*) AS n FROM attempts")[0]["n"] == 0


def test_a_time_limit_shorter_than_one_row_is_refused_before_queueing(local_slurm: LocalSlurm, make_project,
                                                                      tmp_path: Path) -> None:
    project = slurm_project(make_project, tmp_path, estimate_s=600)
    refused = project.run("submit", "--time", "5")
    lines = [line for line in refused.stderr.splitlines() if line.strip()]
    assert refused.returncode == 2 and len(lines) == 1, refused.stdout + refused.stderr
    assert "--time 5" in lines[0] and "10.0 min" in lines[0], lines[0]
    assert query(project, "SELECT * FROM submissions") == []
    doctor = project.run("doctor")
    assert re.search(r"time limit\s.*fail", doctor.stdout), doctor.stdout


def test_workers_put_back_the_rows_of_tasks_slurm_no_longer_runs(local_slurm: LocalSlurm, make_project,
                                                                 tmp_path: Path) -> None:
    """The hour-long grace would keep the killed worker's row: the other worker asks squeue itself."""
    project = slurm_project(make_project, tmp_path)
    job = submit(project, "--workers", "1")
    victim = wait_for("the worker mid-task", lambda: query(
        project, "SELECT t.id, w.pid, w.id AS worker FROM tasks AS t JOIN workers AS w ON w.id = t.worker_id "
                 "WHERE t.status = 'running'"), 120, every=0.2)[0]
    os.kill(victim["pid"], signal.SIGKILL)
    wait_for("its array task to leave Slurm", lambda: job_ended(local_slurm, job), 120)
    let_go(project)
    rescuer = project.run("worker", "--poll-s", "0.2", timeout=300)  # a worker of this sweep, no `reap`
    assert rescuer.returncode == 0, rescuer.stdout + rescuer.stderr
    attempt = query(project, "SELECT outcome, error FROM attempts WHERE task_id = ? AND worker_id = ?",
                    victim["id"], victim["worker"])[0]
    assert attempt["outcome"] == "reaped" and "is gone" in attempt["error"], dict(attempt)
    assert counts(project)["done"] == 8


def test_an_array_that_no_node_can_run_is_refused_before_queueing(local_slurm: LocalSlurm, make_project,
                                                                  tmp_path: Path) -> None:
    project = slurm_project(make_project, tmp_path)
    base = project.base()
    base["slurm"]["cpus_per_task"] = 64
    project.write_base(base)
    refused = project.run("submit")
    lines = [line for line in refused.stderr.splitlines() if line.strip()]
    assert refused.returncode == 2 and len(lines) == 1, refused.stdout + refused.stderr
    assert "64 CPUs" in lines[0] and "slurm.cpus_per_task" in lines[0], lines[0]
    assert query(project, "SELECT * FROM submissions") == []
    doctor = project.run("doctor")
    assert re.search(r"partition\s.*fail", doctor.stdout), doctor.stdout


def test_status_shows_why_an_array_is_pending(local_slurm: LocalSlurm, make_project, tmp_path: Path) -> None:
    project = slurm_project(make_project, tmp_path)
    job = submit(project, "--sbatch-arg=--begin=now+1hour")
    status = wait_for("squeue to list the pending array", lambda: (lambda out: out if "BeginTime" in out else None)(
        project.run("status").stdout), 60, every=1)
    assert job in status
    assert project.run("cancel").returncode == 0
