"""Chaos: a killer SIGKILLs a worker holding a row at six points spread over the sweep (by rows
finished, not by the clock) while the local executor replaces them; afterwards every task is done
exactly once, with one result each, every attempt recorded
and nothing lost, on SQLite and on PostgreSQL. Real tiny LTX-Video runner, real processes.
And the kill that the background stage adds: one row being scored and the next one running."""

from __future__ import annotations

import os
import random
import signal
import threading
from pathlib import Path

import pytest

from hparray.store import Store
from hparray.worker.runtime import STAGE_HOLD_ENV
from tests.acceptance.test_workers import Workers, assert_each_row_done_exactly_once, hold_folder, plan, rows, wait_for
from tests.conftest import Project

LR_VALUES = [round(1e-6 * 1.7**i, 12) for i in range(10)]  # 10 configs x 20 videos = 200 fine-tune rows


# Kill points, as fractions of the rows finished: spread over the whole sweep, and reached on a
# fast machine and a slow one alike, since they count progress, not seconds.
KILL_AT = (0.05, 0.2, 0.35, 0.5, 0.65, 0.8)


def _killer(store_url: str, total: int, stop: threading.Event, kills: list[int], seed: int = 7) -> None:
    """At each kill point, SIGKILL a worker that holds a row (a kill mid-task is the case that
    matters), waiting for one to hold a row if none does at that moment."""
    rng = random.Random(seed)
    store = Store.open(store_url, create=False)
    host = os.uname().nodename.split(".")[0]
    points = [int(total * fraction) for fraction in KILL_AT]
    while points and not stop.wait(0.1):
        try:
            finished = store.task_counts().finished
            if finished < points[0]:
                continue
            busy = [row.pid for row in store.live_workers()
                    if row.host == host and row.current_task is not None and os.path.exists(f"/proc/{row.pid}")]
        except Exception:
            continue
        if busy:
            try:
                os.kill(rng.choice(busy), signal.SIGKILL)
                kills.append(points.pop(0))
            except ProcessLookupError:
                pass
    store.close()


@pytest.mark.slow
def test_killed_workers_lose_nothing_and_repeat_nothing(make_project, db_url: str) -> None:
    project: Project = make_project(
        lr_values=LR_VALUES, categories=("pan", "zoom", "rotate", "objects"), per_category=5, frames=17,
        **{"runner": {"name": "ltx"}, "model": {"inference_steps": 2}, "data.num_videos": 20,
           "data.num_frames": 17, "baseline": {"lr": 1e-5, "condition_frames": 9, "finetune_steps": 2},
           "tasks": {"max_attempts": 50, "gpu_minutes_per_task": 0.01, "baseline_gpu_minutes": 0.01,
                     "heartbeat_interval_s": 1, "heartbeat_grace_s": 10}})
    planned = project.run("--db", db_url, "plan", "--search", "lr")
    assert planned.returncode == 0, planned.stderr
    store = Store.open(db_url, create=False)
    total = store.task_counts().total
    assert total >= 200

    stop, kills = threading.Event(), []
    killer = threading.Thread(target=_killer, args=(db_url, total, stop, kills), daemon=True)
    killer.start()
    try:
        run = project.run("--db", db_url, "submit", "--local", "--workers", "3", timeout=900)
    finally:
        stop.set()
        killer.join()
    assert run.returncode == 0, run.stdout + run.stderr
    assert len(kills) == len(KILL_AT), f"the killer got {len(kills)} of {len(KILL_AT)} workers (at rows {kills})"

    with store.engine.connect() as conn:
        from sqlalchemy import text
        statuses = dict(conn.execute(text("SELECT status, COUNT(*) FROM tasks GROUP BY status")).all())
        results = conn.execute(text("SELECT COUNT(*), COUNT(DISTINCT task_id) FROM results")).one()
        done_attempts = conn.execute(text(
            "SELECT task_id, COUNT(*) FROM attempts WHERE outcome = 'done' GROUP BY task_id")).all()
        dangling = conn.execute(text("SELECT COUNT(*) FROM attempts WHERE outcome IS NULL")).scalar()
        outcomes = dict(conn.execute(text("SELECT outcome, COUNT(*) FROM attempts GROUP BY outcome")).all())
        result_attempts = conn.execute(text(
            "SELECT COUNT(*) FROM results AS r JOIN attempts AS a ON a.id = r.attempt_id "
            "WHERE a.outcome = 'done' AND a.task_id = r.task_id")).scalar()
    assert statuses == {"done": total}, statuses
    assert tuple(results) == (total, total)
    assert len(done_attempts) == total and all(n == 1 for _, n in done_attempts)
    assert result_attempts == total  # each result came from the attempt that won its row
    assert dangling == 0, "an attempt was left without an outcome"
    assert outcomes.get("reaped", 0) >= 1, outcomes  # killed mid-task attempts are on record
    store.close()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_worker_killed_with_a_row_in_its_stage_and_the_next_running_loses_and_repeats_neither(
        make_project, tmp_path: Path) -> None:
    """Row N held in the background stage (scored, not yet recorded) and row N+1 held in the runner
    when the worker is SIGKILLed: both come back after the grace, each is done once, and the dead
    attempts are on record as reaped. The holds are folders (no guess of how long a step takes)."""
    project: Project = make_project(categories=("pan",), per_category=2, lr_values=[1e-5],
                                    **{"data.num_videos": 2})
    store = plan(project)
    marks, hold, stage_hold = tmp_path / "marks", hold_folder(tmp_path), tmp_path / "stage-hold"
    marks.mkdir()
    stage_hold.mkdir()
    (hold / "ticket-1").touch()  # the runner lets one row through; the next one waits in the runner
    group = Workers(project, tmp_path / "logs", None)
    try:
        victim = group.start("worker", env={"HPARRAY_TEST_HOLD": str(hold), "HPARRAY_TEST_MARK_DIR": str(marks),
                                            STAGE_HOLD_ENV: str(stage_hold)})
        staged = wait_for("a row held in the background stage", lambda: list(stage_hold.glob("staged-*")), 300)
        wait_for("the next row to start in the runner", lambda: len(os.listdir(marks)) >= 2, 300, 0.02)
        held = rows(store, "SELECT t.id FROM tasks AS t JOIN workers AS w ON w.id = t.worker_id "
                           "WHERE t.status = 'running' AND w.pid = :pid", pid=victim.pid)
        in_stage = int(staged[0].name.split("-")[1])
        assert len(held) == 2 and in_stage in {row.id for row in held}, (held, in_stage)
        victim.send_signal(signal.SIGKILL)
        assert victim.wait(timeout=30) == -signal.SIGKILL

        rescuer = group.start("worker", "--poll-s", "0.2", env={"HPARRAY_TEST_MARK_DIR": str(marks)})
        assert rescuer.wait(timeout=600) == 0, group.output()[-3000:]
        assert_each_row_done_exactly_once(store, marks, expected_tasks=4, extra_starts=2)
        for row in held:
            outcomes = rows(store, "SELECT outcome FROM attempts WHERE task_id = :id ORDER BY id", id=row.id)
            assert [o.outcome for o in outcomes] == ["reaped", "done"], (row.id, outcomes)
    finally:
        group.kill_all()
        store.close()
