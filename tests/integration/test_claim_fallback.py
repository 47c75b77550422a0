"""The claim path for SQLite < 3.35 (no RETURNING): select + conditional update inside the same
BEGIN IMMEDIATE, with the same order, dependencies and exactly-once guarantee."""

from __future__ import annotations

import threading
import time

import pytest

import hparray.store.sqlite as store_module
from hparray.config import load_sweep
from hparray.plan import build_plan, select_videos
from hparray.store import Store
from hparray.tasks import TaskOutcome
from tests.conftest import Project


@pytest.fixture
def planned(make_project) -> Project:
    project: Project = make_project(lr_values=[1e-6, 1e-5, 1e-4, 1e-3])
    sweep = load_sweep(project.config_dir)
    plan = build_plan(sweep, "lr", select_videos(sweep.settings))
    store = Store.open(str(project.db))
    store.apply_plan(plan.config_rows(), plan.search_config_rows(), plan.video_rows(), plan.tasks, 3, time.time())
    store.close()
    return project


def test_fallback_claims_in_order_and_respects_dependencies(planned: Project, monkeypatch) -> None:
    monkeypatch.setattr(store_module, "HAS_RETURNING", False)
    store = Store.open(str(planned.db))
    first = store.claim("w1", time.time())
    assert first is not None and first.kind == "baseline" and first.attempt == 1
    claimed = [first]
    while (task := store.claim("w1", time.time())) is not None:
        claimed.append(task)
    # Only baselines are claimable while they run: every fine-tune row waits on one.
    assert {t.kind for t in claimed} == {"baseline"}
    assert store.waiting_work() > 0
    for task in claimed:
        assert store.finish(task, TaskOutcome(status="done"), time.time())
    follow = store.claim("w1", time.time())
    assert follow is not None and follow.kind == "finetune"


def test_fallback_hands_every_row_out_exactly_once_under_threads(planned: Project, monkeypatch) -> None:
    monkeypatch.setattr(store_module, "HAS_RETURNING", False)
    store = Store.open(str(planned.db))
    seen: list[int] = []
    lock = threading.Lock()

    def work(name: str) -> None:
        idle_since = None
        while True:
            task = store.claim(name, time.time())
            if task is None:
                if not store.waiting_work():
                    return
                idle_since = idle_since or time.time()
                if time.time() - idle_since > 30:
                    return
                time.sleep(0.01)
                continue
            idle_since = None
            with lock:
                seen.append(task.id)
            store.finish(task, TaskOutcome(status="done"), time.time())

    threads = [threading.Thread(target=work, args=(f"w{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    counts = store.task_counts()
    assert (counts.done, counts.total) == (len(seen), len(seen))
    assert len(seen) == len(set(seen)) == 6 * 4 + 6
