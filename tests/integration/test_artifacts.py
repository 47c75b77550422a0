"""Artifacts on a bad day: a disk that fills up mid-write leaves nothing behind, and only the attempt
that wins its row publishes."""

from __future__ import annotations

import errno
import time
from pathlib import Path

import pytest

from hparray import experiment as experiment_module
from hparray.config import load_sweep
from hparray.environment import WorkerIdentity
from hparray.experiment import Experiment
from hparray.plan import build_plan, select_videos
from hparray.store import Store
from tests.conftest import Project


@pytest.fixture
def claimed(make_project) -> tuple[Project, Store, Experiment]:
    project: Project = make_project(categories=("pan",), per_category=1, lr_values=[1e-5], **{"data.num_videos": 1})
    base = project.base()
    base["data"]["source"] = str(project.root / "videos")
    project.write_base(base)
    sweep = load_sweep(project.config_dir)
    plan = build_plan(sweep, "lr", select_videos(sweep.settings))
    store = Store.open(str(project.db))
    store.apply_plan(plan.config_rows(), plan.search_config_rows(), plan.video_rows(), plan.tasks, 3, time.time())
    return project, store, Experiment(sweep.settings, device="cpu")


def test_a_full_disk_mid_write_leaves_no_temporary_file(claimed, monkeypatch) -> None:
    project, store, experiment = claimed
    me = WorkerIdentity.from_environment("w1")
    store.register_worker(me.id, me.host, me.pid, time.time())
    task = store.claim(me.id, time.time())
    assert task is not None

    def disk_full(path: Path, frames: object, fps: int) -> None:
        Path(path).write_bytes(b"\0" * 4096)  # half a video, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(experiment_module, "write_mp4", disk_full)
    target = project.root / "results" / "baseline_inference" / "cf_4" / task.video
    with pytest.raises(OSError, match="No space left"):
        experiment.run(task, [target])
    left = [str(p.relative_to(project.root)) for p in (project.root / "results").rglob("*") if p.is_file()]
    assert left == [], f"left behind after the error: {left}"
    store.close()
