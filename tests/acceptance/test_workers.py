"""Real `hparray worker` processes against one database: many at once (every row exactly once,
no double claim, no lock errors), killed with SIGKILL (reclaimed after the grace, the dead
attempt fenced), stopped with SIGTERM (the row given back at once), and the local executor
replacing a worker that dies.

Everything is observed through the database and the marks the test runner drops at each task
start, with deadlines instead of fixed sleeps: the CI machine has two loaded cores.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from sqlalchemy import text

from hparray.artifacts import ROUNDING, read_frames
from hparray.store import Store
from hparray.store.queries import QUERIES
from hparray.tasks import ClaimedTask, TaskOutcome
from hparray.worker.runtime import STAGE_HOLD_ENV
from tests.conftest import REPO, Project

# Rows that must never be reaped in the throughput tests: a worker starved of CPU for a few seconds
# is not dead, and a reap there would (correctly) run a row twice and blur what is measured.
CALM = {"tasks.heartbeat_grace_s": 120}


def lr_values(n: int) -> list[float]:
    """n distinct learning rates (3 significant digits, so their names and marks differ)."""
    return [float(f"{1e-6 * 1.4 ** i:.3g}") for i in range(n)]


def wait_for(what: str, predicate: Callable[[], Any], timeout_s: float, interval_s: float = 0.1) -> Any:
    """Poll until `predicate()` is truthy and return it; fail naming `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(interval_s)


def rows(store: Store, sql: str, **params: Any) -> list[Any]:
    with store.engine.connect() as conn:
        return list(conn.execute(text(sql), params))


class Workers:
    """Worker (and submit) processes of one test, output in files; whatever is left is killed."""

    def __init__(self, project: Project, folder: Path, db: str | None):
        self.project, self.folder, self.db = project, folder, db
        self.procs: list[subprocess.Popen] = []
        self.logs: list[Path] = []
        folder.mkdir(parents=True, exist_ok=True)

    def start(self, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        log = self.folder / f"proc-{len(self.procs)}.log"
        with open(log, "wb") as out:
            proc = self.project.popen(*(["--db", self.db] if self.db else []), *args, env=env, stdout=out,
                                      stderr=subprocess.STDOUT)
        self.procs.append(proc)
        self.logs.append(log)
        return proc

    def wait_all(self, stall_s: float = 180, limit_s: float = 1500,
                 progress: Callable[[], Any] | None = None) -> list[int]:
        """Exit codes once every process ended. Fails when nothing moved for `stall_s` (no CPU spent
        by them and no change in `progress()`), or after `limit_s` in all: a loaded machine makes the
        processes slow (16 of them importing torch on 2 busy cores takes minutes), a hang makes them still."""
        started = last_move = time.monotonic()
        seen: Any = None
        while any(proc.poll() is None for proc in self.procs):
            now = time.monotonic()
            state = (round(self.cpu_s()), progress() if progress else None)
            if state != seen:
                seen, last_move = state, now
            if now - last_move > stall_s or now - started > limit_s:
                why = f"no progress for {stall_s:.0f} s" if now - last_move > stall_s else f"over {limit_s:.0f} s"
                pytest.fail(f"processes still running ({why}; progress {seen}):\n{self.output()[-4000:]}")
            time.sleep(0.5)
        return [proc.returncode for proc in self.procs]

    def cpu_s(self) -> float:
        """CPU seconds the still-running processes have spent so far."""
        total = 0.0
        for proc in self.procs:
            with contextlib.suppress(psutil.Error):
                times = psutil.Process(proc.pid).cpu_times()
                total += times.user + times.system
        return total

    def output(self) -> str:
        return "\n".join(f"--- {log.name}\n{log.read_text(errors='replace')}" for log in self.logs if log.exists())

    def kill_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[Callable[..., Workers]]:
    made: list[Workers] = []

    def make(project: Project, db: str | None = None) -> Workers:
        group = Workers(project, tmp_path / f"logs{len(made)}", db)
        made.append(group)
        return group

    yield make
    for group in made:
        group.kill_all()


def plan(project: Project, db: str | None = None) -> Store:
    """`hparray plan --search lr` through the CLI, then the store it wrote."""
    done = project.run(*(["--db", db] if db else []), "plan", "--search", "lr")
    assert done.returncode == 0, done.stdout + done.stderr
    return Store.open(db or str(project.db), create=False)


def mark_keys(marks: Path) -> Counter:
    """Task starts the test runner recorded, by row: `kind-video-lr-condition_frames` (pid and time cut)."""
    return Counter(name.rsplit("-", 2)[0] for name in os.listdir(marks))


def assert_each_row_done_exactly_once(store: Store, marks: Path, expected_tasks: int,
                                      extra_starts: int = 0) -> None:
    """One 'done' attempt and one result per row, every row done, and the runner started
    `expected_tasks + extra_starts` times (extra: attempts that were killed mid-task)."""
    statuses = dict(rows(store, "SELECT status, COUNT(*) FROM tasks GROUP BY status"))
    assert statuses == {"done": expected_tasks}, statuses
    assert rows(store, "SELECT COUNT(*) FROM results")[0][0] == expected_tasks
    per_task = rows(store, "SELECT task_id, COUNT(*) FROM attempts WHERE outcome = 'done' GROUP BY task_id")
    assert len(per_task) == expected_tasks
    assert [row for row in per_task if row[1] != 1] == [], "rows with more than one 'done' attempt"
    unmatched = rows(store, "SELECT r.task_id FROM results AS r JOIN attempts AS a ON a.id = r.attempt_id "
                            "WHERE a.task_id <> r.task_id OR a.outcome <> 'done'")
    assert unmatched == [], "results recorded by an attempt that did not finish that row"
    starts = len(os.listdir(marks))
    assert starts == expected_tasks + extra_starts, f"{starts} task starts for {expected_tasks} rows"


def many_workers_finish_every_row_once(project: Project, workers: Callable[..., Workers], tmp_path: Path,
                                       count: int, expected_tasks: int, db: str | None) -> Workers:
    store = plan(project, db)
    try:
        assert rows(store, "SELECT COUNT(*) FROM tasks")[0][0] == expected_tasks
        marks = tmp_path / "marks"
        marks.mkdir()
        env = {"HPARRAY_TEST_TASK_S": "0", "HPARRAY_TEST_MARK_DIR": str(marks)}
        group = workers(project, db)
        for _ in range(count):  # all started before any is waited on
            group.start("worker", "--poll-s", "0.2", env=env)
        codes = group.wait_all(progress=lambda: rows(store, "SELECT COUNT(*) FROM attempts")[0][0])
        output = group.output()
        assert codes == [0] * count, output[-5000:]
        assert "database is locked" not in output
        assert "Traceback" not in output, output[-5000:]

        assert_each_row_done_exactly_once(store, marks, expected_tasks)
        assert len(mark_keys(marks)) == expected_tasks  # ... and each start was a different row
        registered = rows(store, "SELECT state, COUNT(*) FROM workers GROUP BY state")
        assert dict(registered) == {"stopped": count}
        busy = rows(store, "SELECT COUNT(DISTINCT worker_id) FROM attempts")[0][0]
        assert busy >= 2, "the workers never ran side by side"
        assert rows(store, "SELECT COUNT(*) FROM attempts")[0][0] == expected_tasks  # nothing reaped or retried
    finally:
        store.close()
    return group


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_sixteen_workers_on_one_sqlite_file_finish_every_row_exactly_once(
        make_project: Callable[..., Project], workers: Callable[..., Workers], tmp_path: Path) -> None:
    project = make_project(categories=("pan", "zoom", "tilt", "static"), per_category=5, lr_values=lr_values(25),
                           **{"data.num_videos": 20}, **CALM)
    many_workers_finish_every_row_once(project, workers, tmp_path, count=16, expected_tasks=20 * 25 + 20, db=None)


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.timeout(1800)
def test_eight_workers_on_postgresql_finish_every_row_exactly_once(
        make_project: Callable[..., Project], workers: Callable[..., Workers], tmp_path: Path, pg_url: str) -> None:
    project = make_project(categories=("pan", "zoom"), per_category=5, lr_values=lr_values(19),
                           **{"data.num_videos": 10}, **CALM)
    many_workers_finish_every_row_once(project, workers, tmp_path, count=8, expected_tasks=10 * 19 + 10, db=pg_url)


# ---------------------------------------------------------------- a worker that dies, or is stopped


def running_row_of(store: Store, pid: int) -> Any:
    """The running row held by the worker process `pid`, once it exists."""
    found = rows(store, "SELECT t.id, t.lease, t.attempts, t.worker_id FROM tasks AS t "
                        "JOIN workers AS w ON w.id = t.worker_id WHERE t.status = 'running' AND w.pid = :pid",
                 pid=pid)
    return found[0] if found else None


def hold_folder(parent: Path) -> Path:
    """A folder for HPARRAY_TEST_HOLD: tasks wait until `go` (or a `ticket-*`) appears in it."""
    folder = parent / "hold"
    folder.mkdir(exist_ok=True)
    return folder


def mark_pid(marks: Path) -> int | None:
    """The pid of a worker whose task has started (from the runner's marks)."""
    names = os.listdir(marks)
    return int(names[0].rsplit("-", 2)[1]) if names else None


def one_video_project(make_project: Callable[..., Project]) -> Project:
    """One video, one lr: a baseline row, and a fine-tune row that waits for it."""
    return make_project(categories=("pan",), per_category=1, lr_values=[1e-5], **{"data.num_videos": 1})


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_killed_worker_row_is_reclaimed_after_the_grace_and_its_late_finish_is_fenced(
        make_project: Callable[..., Project], workers: Callable[..., Workers], tmp_path: Path) -> None:
    project = one_video_project(make_project)
    grace_s = float(project.base()["tasks"]["heartbeat_grace_s"])
    store = plan(project)
    marks = tmp_path / "marks"
    marks.mkdir()
    group = workers(project)
    # Held until killed: it is mid-task however slow this process is to kill it.
    victim = group.start("worker", env={"HPARRAY_TEST_HOLD": str(hold_folder(tmp_path)),
                                              "HPARRAY_TEST_MARK_DIR": str(marks)})
    held = wait_for("the victim to be running its row", lambda: running_row_of(store, victim.pid), 300)
    wait_for("the victim's task to start", lambda: os.listdir(marks), 30, 0.02)
    victim.send_signal(signal.SIGKILL)
    assert victim.wait(timeout=30) == -signal.SIGKILL
    assert rows(store, "SELECT status, lease FROM tasks WHERE id = :id", id=held.id)[0] == ("running", held.lease)

    rescuer = group.start("worker", "--poll-s", "0.2",
                          env={"HPARRAY_TEST_TASK_S": "0", "HPARRAY_TEST_MARK_DIR": str(marks)})
    assert rescuer.wait(timeout=400) == 0, group.output()[-3000:]

    assert_each_row_done_exactly_once(store, marks, expected_tasks=2, extra_starts=1)
    attempts = rows(store, "SELECT id, lease, outcome, worker_id, started_at, heartbeat_at FROM attempts "
                           "WHERE task_id = :id ORDER BY id", id=held.id)
    assert [(a.lease, a.outcome) for a in attempts] == [(held.lease, "reaped"), (attempts[1].lease, "done")]
    dead, second = attempts
    assert second.worker_id != held.worker_id
    assert second.started_at >= dead.heartbeat_at + grace_s, "reclaimed before the heartbeat grace ran out"
    result = rows(store, "SELECT attempt_id, psnr FROM results WHERE task_id = :id", id=held.id)
    assert [r.attempt_id for r in result] == [second.id]

    # The killed attempt's lease no longer finishes anything: no second result, an event says so.
    info = rows(store, QUERIES["claimed_task"], task_id=held.id)[0]
    late = ClaimedTask(id=held.id, lease=held.lease, attempt=1, max_attempts=3, kind=info.kind,
                       config_hash=info.config_hash, video=info.video, video_path=info.video_path,
                       category=info.category, caption=info.caption, video_seed=info.video_seed, lr=info.lr,
                       condition_frames=info.condition_frames, finetune_steps=info.finetune_steps,
                       estimate_s=info.estimate_s)
    assert store.finish(late, TaskOutcome(status="done", metrics={"psnr": 99.0}), time.time()) is False
    assert rows(store, "SELECT attempt_id, psnr FROM results WHERE task_id = :id", id=held.id) == result
    assert rows(store, "SELECT COUNT(*) FROM results")[0][0] == 2
    assert rows(store, "SELECT outcome FROM attempts WHERE lease = :l", l=held.lease)[0][0] == "fenced"
    assert rows(store, "SELECT COUNT(*) FROM events WHERE kind = 'fenced' AND lease = :l", l=held.lease)[0][0] == 1
    store.close()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_sigterm_gives_the_row_back_at_once_without_spending_an_attempt(
        make_project: Callable[..., Project], workers: Callable[..., Workers], tmp_path: Path) -> None:
    project = one_video_project(make_project)
    store = plan(project)
    marks = tmp_path / "marks"
    marks.mkdir()
    before = rows(store, "SELECT attempts FROM tasks WHERE kind = 'baseline'")[0][0]
    group = workers(project)
    worker = group.start("worker", env={"HPARRAY_TEST_HOLD": str(hold_folder(tmp_path)),
                                              "HPARRAY_TEST_MARK_DIR": str(marks)})
    held = wait_for("the worker to be running its row", lambda: running_row_of(store, worker.pid), 300)
    wait_for("the task to start", lambda: os.listdir(marks), 30, 0.02)
    assert held.attempts == before + 1

    worker.send_signal(signal.SIGTERM)
    # At once: the worker puts it back itself (no reaper runs here, and a reap would spend the attempt).
    row = wait_for("the row to be pending again", lambda: [r for r in rows(
        store, "SELECT status, attempts, lease, worker_id FROM tasks WHERE id = :id", id=held.id)
        if r.status == "pending"], 120, 0.05)[0]
    assert (row.attempts, row.lease, row.worker_id) == (before, None, None)
    assert rows(store, "SELECT outcome FROM attempts WHERE lease = :l", l=held.lease)[0][0] == "released"
    assert rows(store, "SELECT COUNT(*) FROM attempts")[0][0] == 1
    assert worker.wait(timeout=120) == 0, group.output()
    assert "1 released" in group.output()
    assert rows(store, "SELECT state FROM workers WHERE pid = :pid", pid=worker.pid)[0][0] == "stopped"
    store.close()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_sigterm_gives_back_the_running_row_and_waits_for_the_row_in_the_stage(
        make_project: Callable[..., Project], workers: Callable[..., Workers], tmp_path: Path) -> None:
    """Row N is in the background stage (held there) and row N+1 in the runner: SIGTERM gives N+1
    back at once, and the worker waits for N, which is recorded once the stage goes on."""
    project = make_project(categories=("pan",), per_category=2, lr_values=[1e-5], **{"data.num_videos": 2})
    store = plan(project)
    marks, hold, stage_hold = tmp_path / "marks", hold_folder(tmp_path), tmp_path / "stage-hold"
    marks.mkdir()
    stage_hold.mkdir()
    (hold / "ticket-1").touch()
    group = workers(project)
    worker = group.start("worker", env={"HPARRAY_TEST_HOLD": str(hold), "HPARRAY_TEST_MARK_DIR": str(marks),
                                        STAGE_HOLD_ENV: str(stage_hold)})
    staged = wait_for("a row held in the stage", lambda: list(stage_hold.glob("staged-*")), 300)
    wait_for("the next row to start in the runner", lambda: len(os.listdir(marks)) >= 2, 300, 0.02)
    in_stage = int(staged[0].name.split("-")[1])
    running = [r.id for r in rows(store, "SELECT id FROM tasks WHERE status = 'running'") if r.id != in_stage]
    assert len(running) == 1

    worker.send_signal(signal.SIGTERM)
    wait_for("the running row to be given back", lambda: rows(
        store, "SELECT status FROM tasks WHERE id = :id", id=running[0])[0].status == "pending", 120, 0.05)
    assert rows(store, "SELECT status FROM tasks WHERE id = :id", id=in_stage)[0].status == "running"
    (stage_hold / "go").touch()
    assert worker.wait(timeout=120) == 0, group.output()
    assert rows(store, "SELECT status FROM tasks WHERE id = :id", id=in_stage)[0].status == "done"
    assert [r.outcome for r in rows(store, "SELECT outcome FROM attempts WHERE task_id = :id", id=in_stage)] == ["done"]
    assert [r.outcome for r in rows(store, "SELECT outcome FROM attempts WHERE task_id = :id",
                                    id=running[0])] == ["released"]
    store.close()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_local_executor_replaces_a_worker_killed_mid_task(
        make_project: Callable[..., Project], workers: Callable[..., Workers], tmp_path: Path) -> None:
    project = make_project(categories=("pan", "zoom"), per_category=1, lr_values=[1e-6, 1e-5, 1e-4],
                           **{"data.num_videos": 2})
    store = plan(project)
    marks = tmp_path / "marks"
    marks.mkdir()
    group = workers(project)
    hold = hold_folder(tmp_path)
    submit = group.start("submit", "--local", "--workers", "2",
                         env={"HPARRAY_TEST_HOLD": str(hold), "HPARRAY_TEST_MARK_DIR": str(marks)})
    try:
        # Every task holds until hold/go exists: the victim is mid-task however slow this process is.
        pid = wait_for("a worker starting a task", lambda: mark_pid(marks), 300, 0.05)
        os.kill(pid, signal.SIGKILL)
        (hold / "go").touch()
        assert submit.wait(timeout=600) == 0, group.output()[-4000:]
    finally:
        for row in rows(store, "SELECT pid FROM workers WHERE state = 'running'"):  # a failed run's leftovers
            with contextlib.suppress(ProcessLookupError):
                os.kill(row.pid, signal.SIGKILL)

    output = group.output()
    assert re.search(r"\(1 workers replaced\)", output), output[-3000:]
    killed = rows(store, "SELECT a.outcome FROM attempts AS a JOIN workers AS w ON w.id = a.worker_id "
                         "WHERE w.pid = :pid ORDER BY a.id", pid=pid)
    assert [r.outcome for r in killed][-1:] == ["reaped"], f"the worker was not killed mid-task: {killed}"
    assert_each_row_done_exactly_once(store, marks, expected_tasks=8, extra_starts=1)
    logs = list((project.root / "results" / "logs").glob("worker-*.log"))
    assert logs and not any("database is locked" in log.read_text() for log in logs)
    store.close()


@pytest.mark.slow
def test_ctrl_c_on_the_local_executor_puts_every_claimed_row_back(make_project) -> None:
    """Ctrl-C (SIGINT to `submit --local`) stops every worker cleanly: rows pending again,
    their attempts given back, nothing left running."""
    import signal as signals
    import sqlite3
    import time as clock

    project: Project = make_project()
    assert project.run("plan", "--search", "lr").returncode == 0
    submit = project.popen("submit", "--local", "--workers", "2",
                           env={"HPARRAY_TEST_HOLD": str(hold_folder(project.root))},
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = clock.time() + 120
    running = 0
    while clock.time() < deadline and running < 2:
        clock.sleep(0.5)
        if project.db.exists():
            with sqlite3.connect(project.db) as conn:
                running = conn.execute("SELECT COUNT(*) FROM tasks WHERE status = 'running'").fetchone()[0]
    assert running == 2, "two workers never got to work"
    submit.send_signal(signals.SIGINT)
    out, err = submit.communicate(timeout=120)
    assert submit.returncode == 130, out + err
    with sqlite3.connect(project.db) as conn:
        statuses = dict(conn.execute("SELECT status, COUNT(*) FROM tasks GROUP BY status").fetchall())
        spent = conn.execute("SELECT COALESCE(SUM(attempts), 0) FROM tasks").fetchone()[0]
        released = conn.execute("SELECT COUNT(*) FROM attempts WHERE outcome = 'released'").fetchone()[0]
    assert "running" not in statuses and statuses.get("pending") == 24, statuses
    assert spent == 0 and released == 2


def test_when_workers_keep_dying_submit_says_what_the_last_one_said(make_project) -> None:
    project: Project = make_project(**{"runner": {"name": "tests.support.runners:BrokenLoadRunner"}})
    assert project.run("plan", "--search", "lr").returncode == 0
    result = project.run("submit", "--local", "--workers", "1", timeout=600)
    assert result.returncode == 1, result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "gave up" in lines[0], result.stderr
    assert "no CUDA-capable device is detected on gpu-node-7" in lines[0], lines[0]


# ---------------------------------------------------------------- faults between processes


OTHER_NODE = Path(__file__).resolve().parent.parent / "support" / "othernode"


def test_workers_on_nodes_ten_minutes_apart_reap_no_healthy_row(
        make_project: Callable[..., Project], workers: Callable[..., Workers], tmp_path: Path) -> None:
    """One worker's clock 10 minutes ahead, one 10 minutes behind, a 3 s grace: liveness must not
    rest on comparing one node's stamps with another node's clock."""
    project = make_project(categories=("pan", "zoom"), per_category=3, lr_values=lr_values(6),
                           **{"data.num_videos": 6})
    store = plan(project)
    try:
        marks = tmp_path / "marks"
        marks.mkdir()
        group = workers(project)
        for host, shift in (("node-ahead", 600), ("node-behind", -600)):
            group.start("worker", "--poll-s", "0.2", env={
                "PYTHONPATH": f"{OTHER_NODE}{os.pathsep}{REPO}",
                "HPARRAY_TEST_HOST": host, "HPARRAY_TEST_CLOCK_SHIFT_S": str(shift),
                "HPARRAY_TEST_TASK_S": "0.3", "HPARRAY_TEST_MARK_DIR": str(marks)})
        codes = group.wait_all(progress=lambda: rows(store, "SELECT COUNT(*) FROM attempts")[0][0])
        assert codes == [0, 0], group.output()[-4000:]
        hosts = {row.host for row in rows(store, "SELECT host FROM workers")}
        assert hosts == {"node-ahead", "node-behind"}  # the workers did look like two nodes
        outcomes = dict(rows(store, "SELECT outcome, COUNT(*) FROM attempts GROUP BY outcome"))
        assert outcomes == {"done": 42}, outcomes  # 6 videos x (1 inference + 6 fine-tune); none reaped
        assert dict(rows(store, "SELECT state, COUNT(*) FROM workers GROUP BY state")) == {"stopped": 2}
    finally:
        store.close()


def test_a_fenced_late_worker_leaves_the_winners_artifacts_alone(
        make_project: Callable[..., Project], workers: Callable[..., Workers], tmp_path: Path) -> None:
    """Worker A is stopped mid-task long enough to be reaped; B runs the row and publishes its
    artifacts; A wakes up, finishes, is fenced, and must publish nothing."""
    import numpy as np

    project = one_video_project(make_project)
    store = plan(project)
    try:
        hold = hold_folder(tmp_path)
        group = workers(project)
        late = group.start("worker", env={"HPARRAY_TEST_HOLD": str(hold), "HPARRAY_TEST_SHADE": "0.25"})
        held = wait_for("A to hold its row", lambda: running_row_of(store, late.pid), 300)
        late.send_signal(signal.SIGSTOP)
        winner = group.start("worker", "--poll-s", "0.2", env={"HPARRAY_TEST_SHADE": "0.75"})
        assert winner.wait(timeout=600) == 0, group.output()[-3000:]
        (hold / "go").touch()
        late.send_signal(signal.SIGCONT)
        assert late.wait(timeout=600) == 0, group.output()[-3000:]

        outcomes = [r.outcome for r in rows(store, "SELECT outcome FROM attempts WHERE task_id = :id ORDER BY id",
                                            id=held.id)]
        assert outcomes == ["fenced", "done"], outcomes
        artifact = Path(rows(store, "SELECT artifact_dir FROM results WHERE task_id = :id", id=held.id)[0][0])
        frames = read_frames(artifact)  # frames.mkv: uint8, so to within rounding
        assert frames is not None
        truth = np.load(project.root / "videos" / "pan" / "pan0.npy").astype(np.float32) / 255.0
        cf = project.base()["baseline"]["condition_frames"]
        np.testing.assert_allclose(frames[cf:], np.broadcast_to(truth[cf - 1] * 0.75, frames[cf:].shape),
                                   atol=ROUNDING + 1e-6)  # B's frames, not A's (0.25)
        leftovers = [p.name for p in (project.root / "results").rglob(".*")]
        assert leftovers == [], f"temporary artifacts left behind: {leftovers}"
        assert "0 done, 0 diverged, 0 errors, 0 released, 1 fenced" in group.output()  # A's summary line
    finally:
        store.close()


def test_a_node_wide_fault_trips_the_circuit_breaker_instead_of_failing_the_sweep(make_project) -> None:
    project: Project = make_project()
    assert project.run("plan", "--search", "lr").returncode == 0
    ran = project.run("worker", env={"HPARRAY_TEST_FAIL": "disk-full"}, timeout=300)
    assert ran.returncode == 3, ran.stdout + ran.stderr
    lines = [line for line in ran.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "3 rows in a row" in lines[0] and "No space left on device" in lines[0], ran.stderr
    store = Store.open(str(project.db), create=False)
    try:
        statuses = dict(rows(store, "SELECT status, COUNT(*) FROM tasks GROUP BY status"))
        assert statuses == {"pending": 24}, statuses  # nothing failed for good: the sweep can resume
        assert rows(store, "SELECT COUNT(*) FROM attempts WHERE outcome = 'error'")[0][0] == 3
    finally:
        store.close()


def test_a_worker_refusing_configs_that_differ_from_the_plan_is_not_respawned(make_project) -> None:
    project: Project = make_project()
    assert project.run("plan", "--search", "lr").returncode == 0
    base = project.base()
    base["seed"] = 7  # changes every config's hash: these configs would not reproduce the planned rows
    project.write_base(base)
    result = project.run("submit", "--local", "--workers", "2", timeout=600)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "(0 workers replaced)" in result.stdout, result.stdout
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "would not reproduce the planned config" in errors[0], result.stderr
    logs = (project.root / "results" / "logs").glob("worker-*.log")
    assert sum(log.read_text().count("would not reproduce") for log in logs) == 2  # once per worker started


@pytest.mark.parametrize("signame", ["SIGUSR1", "SIGTERM"])
def test_a_stop_signal_while_the_model_loads_ends_the_worker_cleanly(
        make_project: Callable[..., Project], workers: Callable[..., Workers], tmp_path: Path, signame: str) -> None:
    project = make_project(**{"runner": {"name": "tests.support.runners:SlowLoadRunner"}})
    store = plan(project)
    try:
        marks = tmp_path / "marks"
        marks.mkdir()
        group = workers(project)
        worker = group.start("worker", env={"HPARRAY_TEST_HOLD": str(hold_folder(tmp_path)),
                                            "HPARRAY_TEST_MARK_DIR": str(marks)})
        wait_for("the model to be loading", lambda: (marks / "loading").exists(), 300, 0.05)
        worker.send_signal(getattr(signal, signame))
        assert worker.wait(timeout=120) == 0, group.output()[-3000:]
        assert "while loading the model, before the first claim" in group.output()
        assert rows(store, "SELECT COUNT(*) FROM attempts")[0][0] == 0
    finally:
        store.close()


def test_after_a_clean_stop_a_second_stop_signal_does_not_kill_the_worker() -> None:
    """slurmstepd and the batch script both send TERM: the second must find a handler, not the default."""
    import signal as signals

    from hparray.environment import WorkerIdentity
    from hparray.worker.loop import STOP_SIGNALS, Worker

    class NoStore:
        def register_worker(self, *args: Any, **kwargs: Any) -> None: ...
        def stop_worker(self, *args: Any) -> None: ...
        def reap(self, *args: Any, **kwargs: Any) -> Any:
            return type("Report", (), {"released": [], "failed": []})()
        def claim(self, *args: Any) -> None: ...
        def waiting_work(self) -> int:
            return 0

    previous = {sig: signals.getsignal(sig) for sig in STOP_SIGNALS}
    try:
        worker = Worker(NoStore(), lambda task: None, WorkerIdentity.from_environment("w"),  # type: ignore[arg-type]
                        heartbeat_interval_s=1, heartbeat_grace_s=3)
        worker.catch_stop_signals()
        assert worker.run().stop_reason == "nothing left to claim"
        for sig in STOP_SIGNALS:
            assert signals.getsignal(sig) not in (signals.SIG_DFL, signals.default_int_handler), sig
        os.kill(os.getpid(), signals.SIGTERM)  # noted and ignored: this test process lives on
    finally:
        for sig, handler in previous.items():
            signals.signal(sig, handler)
