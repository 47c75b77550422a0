"""`hparray plan` through the real command on the shipped configs and the bundled sample videos."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import pytest

from tests.conftest import REPO, Project


@pytest.fixture(scope="session")
def sample_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("hparray-cache")


@pytest.fixture
def shipped(tmp_path: Path, sample_cache: Path) -> Project:
    shutil.copytree(REPO / "configs", tmp_path / "configs")
    return Project(tmp_path, env={"HPARRAY_CACHE": str(sample_cache)})


def _counts(db: Path) -> dict[str, int]:
    with sqlite3.connect(db) as conn:
        return dict(conn.execute("SELECT kind, COUNT(*) FROM tasks GROUP BY kind").fetchall())


def test_full_grid_on_sample_videos(shipped: Project) -> None:
    dry = shipped.run("plan", "--search", "all", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "would add 360 rows" in dry.stdout and "GPU-hours" in dry.stdout
    assert not shipped.db.exists(), "--dry-run must write nothing"

    lr = shipped.run("plan", "--search", "lr")
    assert lr.returncode == 0, lr.stderr
    assert _counts(shipped.db) == {"finetune": 5 * 20, "baseline": 20}

    full = shipped.run("plan", "--search", "all")
    assert full.returncode == 0, full.stderr
    assert "added 240 rows (120 already planned)" in full.stdout
    assert _counts(shipped.db) == {"finetune": 13 * 20, "baseline": 5 * 20}

    again = shipped.run("plan", "--search", "all")
    assert "added 0 rows (360 already planned)" in again.stdout
    dry_again = shipped.run("plan", "--search", "all", "--dry-run")
    assert "would add 0 rows" in dry_again.stdout


def test_same_seed_same_videos(shipped: Project, tmp_path: Path) -> None:
    first = shipped.run("plan", "--search", "lr")
    assert first.returncode == 0, first.stderr
    other = Project(tmp_path / "other", env=shipped.env)
    shutil.copytree(REPO / "configs", other.root / "configs")
    assert other.run("plan", "--search", "lr").returncode == 0
    videos = []
    for project in (shipped, other):
        with sqlite3.connect(project.db) as conn:
            videos.append([row[0] for row in conn.execute("SELECT name FROM videos ORDER BY name")])
    assert videos[0] == videos[1] and len(videos[0]) == 20


def test_changing_a_config_adds_rows_and_keeps_finished_ones(make_project) -> None:
    project: Project = make_project(lr_values=[1e-6, 1e-5])
    assert project.run("plan", "--search", "lr").returncode == 0
    assert project.run("submit", "--local", "--workers", "1").returncode == 0
    with sqlite3.connect(project.db) as conn:
        before = conn.execute("SELECT task_id, psnr, recorded_at FROM results ORDER BY task_id").fetchall()
    project.write_search("lr", "lr", [1e-6, 1e-5, 1e-4])
    added = project.run("plan", "--search", "lr")
    assert "added 6 rows (18 already planned)" in added.stdout, added.stdout
    with sqlite3.connect(project.db) as conn:
        after = conn.execute("SELECT task_id, psnr, recorded_at FROM results ORDER BY task_id").fetchall()
        pending = conn.execute("SELECT COUNT(*) FROM tasks WHERE status = 'pending'").fetchone()[0]
    assert after == before and pending == 6
