"""Shared fixtures: a throw-away project (configs + small real video files + database) and a
way to run the real `hparray` command against it in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from tests.pg import PostgresServer, PostgresUnavailable

REPO = Path(__file__).resolve().parent.parent
TEST_RUNNER = "tests.support.runners:SleepyRunner"


def subprocess_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for child processes: the repo importable (tests.support), one thread each."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("MKL_NUM_THREADS", "1")
    env.pop("HPARRAY_DB", None)
    env.update(extra or {})
    return env


def write_videos(folder: Path, categories: tuple[str, ...] = ("pan", "zoom"), per_category: int = 3,
                 frames: int = 12, size: int = 32, seed: int = 0) -> list[Path]:
    """Small real .npy videos (a moving gradient) in category subfolders."""
    rng = np.random.default_rng(seed)
    paths = []
    for category in categories:
        (folder / category).mkdir(parents=True, exist_ok=True)
        for i in range(per_category):
            y, x = np.mgrid[0:size, 0:size] / size
            phase = rng.uniform(0, 1)
            video = np.stack([np.stack([np.sin(6 * (x + 0.03 * t + phase)) * 0.5 + 0.5,
                                        y, np.full_like(x, i / per_category)], axis=-1) for t in range(frames)])
            path = folder / category / f"{category}{i}.npy"
            np.save(path, (video * 255).astype(np.uint8))
            paths.append(path)
    return paths


@dataclass
class Project:
    """A project folder with configs/, videos/ and results.db, driven through the real CLI."""

    root: Path
    env: dict[str, str] = field(default_factory=dict)

    @property
    def config_dir(self) -> Path:
        return self.root / "configs"

    @property
    def db(self) -> Path:
        return self.root / "results.db"

    def run(self, *args: str, timeout: float = 300, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "hparray", *args], cwd=self.root, capture_output=True,
                              text=True, timeout=timeout, env=subprocess_env({**self.env, **(env or {})}))

    def popen(self, *args: str, env: dict[str, str] | None = None, **kwargs: Any) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "hparray", *args], cwd=self.root,
                                env=subprocess_env({**self.env, **(env or {})}), **kwargs)

    def base(self) -> dict[str, Any]:
        return yaml.safe_load((self.config_dir / "base.yaml").read_text())

    def write_base(self, base: dict[str, Any]) -> None:
        (self.config_dir / "base.yaml").write_text(yaml.safe_dump(base, sort_keys=False))

    def write_search(self, name: str, parameter: str, values: list[Any]) -> None:
        (self.config_dir / f"{name}_search.yaml").write_text(
            yaml.safe_dump({"search": name, "parameter": parameter, "values": values}, sort_keys=False))


def base_config(source: str, **overrides: Any) -> dict[str, Any]:
    """A small, fast base.yaml for tests (test runner, PSNR only, 12 frames of 32x32)."""
    base: dict[str, Any] = {
        "seed": 0,
        "baseline": {"lr": 1e-5, "condition_frames": 4, "finetune_steps": 2},
        "data": {"source": source, "num_videos": 6, "stratify_by": "category", "num_frames": 12,
                 "height": 32, "width": 32},
        "runner": {"name": TEST_RUNNER},
        "metrics": ["psnr"],
        "tasks": {"max_attempts": 3, "gpu_minutes_per_task": 0.05, "baseline_gpu_minutes": 0.02,
                  "heartbeat_interval_s": 0.5, "heartbeat_grace_s": 3},
    }
    for key, value in overrides.items():
        section, _, name = key.partition(".")
        if name:
            base.setdefault(section, {})[name] = value
        else:
            base[section] = value
    return base


@pytest.fixture
def make_project(tmp_path: Path) -> Callable[..., Project]:
    """make_project(lr_values=[...], videos=(categories, per_category), **base overrides) -> Project."""
    counter = iter(range(1000))

    def make(lr_values: list[float] | None = None, categories: tuple[str, ...] = ("pan", "zoom"),
             per_category: int = 3, frames: int = 12, folder: str | None = None, **overrides: Any) -> Project:
        root = tmp_path / (folder or f"project{next(counter)}")
        (root / "configs").mkdir(parents=True)
        write_videos(root / "videos", categories, per_category, frames=frames)
        project = Project(root)
        project.write_base(base_config("videos", **overrides))
        project.write_search("lr", "lr", lr_values or [1e-6, 1e-5, 1e-4])
        return project

    return make


# ---------------------------------------------------------------- PostgreSQL (tests/pg.py)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresServer]:
    """One real PostgreSQL server for the session; tests skip (with the reason) where there is none."""
    try:
        server = PostgresServer.start()
    except PostgresUnavailable as why:
        pytest.skip(f"no PostgreSQL: {why}")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def pg_url(pg_server: PostgresServer) -> Iterator[str]:
    """A fresh, empty database on the session's server: postgresql+psycopg://hparray@127.0.0.1:PORT/t_..."""
    url = pg_server.database()
    yield url
    pg_server.drop(url)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh database URL of each backend: an SQLite file in tmp_path, or a new PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store.db'}"
    return str(request.getfixturevalue("pg_url"))
