"""Chaos: a killer SIGKILLs a worker holding a row at six points spread over the sweep (by rows
finished, not by the clock) while the local executor replaces them; afterwards every task is done
exactly once, with one result each, every attempt recorded
and nothing lost, on SQLite and on PostgreSQL. Real tiny LTX-Video runner, real processes."""

from __future__ import annotations

import os
import random
import signal
import threading

import pytest

from hparray.store import Store
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
