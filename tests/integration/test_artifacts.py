"""Artifacts on a bad day: a disk that fills up mid-write leaves nothing behind, and only the attempt
that wins its row publishes. And on a good one: each `artifacts:` setting writes its files, and the
lossless default reads back within uint8 rounding of the scored float frames."""

from __future__ import annotations

import errno
import time
from pathlib import Path

import numpy as np
import pytest

from hparray import artifacts as artifacts_module
from hparray.config import load_sweep
from hparray.environment import WorkerIdentity
from hparray.experiment import Experiment
from hparray.metrics import psnr
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

    monkeypatch.setattr(artifacts_module, "write_mp4", disk_full)
    target = project.root / "results" / "baseline_inference" / "cf_4" / task.video
    with pytest.raises(OSError, match="No space left"):
        experiment.run(task, [target])
    left = [str(p.relative_to(project.root)) for p in (project.root / "results").rglob("*") if p.is_file()]
    assert left == [], f"left behind after the error: {left}"
    store.close()


@pytest.mark.parametrize("shape", [(9, 64, 64, 3), (5, 360, 640, 3)])
def test_recomputing_from_the_lossless_artifact_differs_only_by_uint8_rounding(tmp_path: Path, shape) -> None:
    """frames.mkv gives back the rounded frames exactly: every value within 0.5/255 of the float
    output, so a frame's RMSE moves by at most that much and its PSNR by the bound derived from it."""
    rng = np.random.default_rng(0)
    frames = np.clip(rng.normal(0.5, 0.2, shape), 0, 1).astype(np.float32)
    truth = np.clip(frames + rng.normal(0, 0.05, shape), 0, 1).astype(np.float32)
    staged = artifacts_module.stage_artifacts(frames, tmp_path / "row", 25, "lease-1", "lossless")
    assert staged is not None and sorted(p.name for p in staged.iterdir()) == ["frames.mkv", "generated.mp4"]
    back = artifacts_module.read_frames(staged)
    assert back is not None and back.shape == frames.shape
    np.testing.assert_array_equal(back, artifacts_module.to_uint8(frames) / np.float32(255.0))
    assert float(np.abs(back - frames).max()) <= artifacts_module.ROUNDING + 1e-7
    for pred, again, real in zip(frames, back, truth, strict=True):
        rmse, rmse_again = (float(np.sqrt(np.mean((np.float64(x) - real) ** 2))) for x in (pred, again))
        assert abs(rmse - rmse_again) <= artifacts_module.ROUNDING + 1e-9
        bound_db = 20 * np.log10(1 + artifacts_module.ROUNDING / min(rmse, rmse_again))
        assert abs(psnr(pred, real) - psnr(again, real)) <= bound_db + 1e-9


def test_each_artifacts_setting_writes_what_it_says(tmp_path: Path) -> None:
    frames = np.random.default_rng(1).random((5, 32, 32, 3), dtype=np.float32)
    written = {kind: artifacts_module.stage_artifacts(frames, tmp_path / kind, 25, "lease-2", kind)
               for kind in artifacts_module.KINDS}
    assert written["none"] is None
    assert {kind: sorted(p.name for p in folder.iterdir()) for kind, folder in written.items() if folder} == {
        "lossless": ["frames.mkv", "generated.mp4"], "preview": ["generated.mp4"],
        "full": ["frames.npz", "generated.mp4"]}
    full = written["full"]
    assert full is not None
    np.testing.assert_array_equal(artifacts_module.read_frames(full), frames)
