"""GPU memory through the CLI, on a real LTX-Video checkpoint with a text encoder (tiny, built
here): `plan` says what a row needs, `doctor` checks it, and `submit` refuses a sweep whose rows
do not fit the stated GPU before any row runs."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import Project


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from hparray.demo.tiny_text import save_checkpoint_with_text

    return save_checkpoint_with_text(tmp_path_factory.mktemp("ltx-cli") / "checkpoint")


def project_with(make_project: Callable[..., Project], checkpoint: Path, gpu_gib: float) -> Project:
    return make_project(lr_values=[1e-5, 1e-4], per_category=1, frames=17, **{
        "runner": {"name": "ltx"}, "model": {"path": str(checkpoint), "inference_steps": 2}, "metrics": ["psnr"],
        "data.num_frames": 17,
        "data.height": 32, "data.width": 32, "baseline": {"lr": 1e-4, "condition_frames": 9, "finetune_steps": 2},
        "slurm.gpu_memory_gib": gpu_gib})


def test_a_sweep_too_large_for_the_stated_gpu_is_refused_before_anything_runs(make_project, checkpoint: Path
                                                                              ) -> None:
    project = project_with(make_project, checkpoint, gpu_gib=0.5)
    planned = project.run("plan", "--search", "lr")
    assert planned.returncode == 0, planned.stderr
    assert "GPU memory: about" in planned.stdout and "does NOT fit the 0.5 GiB GPU" in planned.stdout
    assert "T5 prompts from the checkpoint" in planned.stdout
    refused = project.run("submit", "--local", "--workers", "1")
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert refused.returncode == 2 and len(errors) == 1, refused.stdout + refused.stderr
    assert "model.finetune: lora" in errors[0] and "Traceback" not in refused.stderr
    with sqlite3.connect(project.db) as conn:
        assert conn.execute("SELECT COUNT(*) FROM attempts").fetchone() == (0,)
        assert conn.execute("SELECT COUNT(*) FROM workers").fetchone() == (0,)
    doctor = project.run("doctor")
    assert "gpu memory" in doctor.stdout and "does NOT fit" in doctor.stdout


def test_a_sweep_that_fits_runs_with_its_prompts(make_project, checkpoint: Path) -> None:
    project = project_with(make_project, checkpoint, gpu_gib=80)
    assert project.run("plan", "--search", "lr").returncode == 0
    ran = project.run("submit", "--local", "--workers", "1", timeout=900)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    with sqlite3.connect(project.db) as conn:
        assert conn.execute("SELECT status, COUNT(*) FROM tasks GROUP BY status").fetchall() == [("done", 6)]
        details = [row[0] for row in conn.execute("SELECT details FROM results")]
    assert all('"prompt": ' in d and '"precision": ' in d for d in details)
