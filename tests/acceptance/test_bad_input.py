"""Bad input at the command line: one line naming the problem, a non-zero exit, no traceback,
and the database exactly as it was."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from tests.conftest import Project


def dump(db: Path) -> list[str]:
    if not db.exists():
        return []
    with sqlite3.connect(db) as conn:
        return list(conn.iterdump())


def edit_base(section: str | None, key: str, value: object) -> Callable[[Project], list[str]]:
    def apply(project: Project) -> list[str]:
        base = project.base()
        (base[section] if section else base)[key] = value
        project.write_base(base)
        return ["plan", "--search", "lr"]
    return apply


def edit_search(key: str, value: object) -> Callable[[Project], list[str]]:
    def apply(project: Project) -> list[str]:
        path = project.config_dir / "lr_search.yaml"
        data = yaml.safe_load(path.read_text())
        data[key] = value
        path.write_text(yaml.safe_dump(data))
        return ["plan", "--search", "lr"]
    return apply


def raw_yaml(project: Project) -> list[str]:
    (project.config_dir / "base.yaml").write_text("seed: 0\nbaseline: {lr: 1e-5\n")
    return ["plan", "--search", "lr"]


def missing_source(project: Project) -> list[str]:
    return edit_base("data", "source", "no/such/folder")(project)


def short_video(project: Project) -> list[str]:
    import numpy as np
    np.save(project.root / "videos" / "pan" / "short.npy", np.zeros((5, 32, 32, 3), np.uint8))
    base = project.base()
    base["data"]["num_videos"] = 100  # take every video, the short one included
    project.write_base(base)
    return ["plan", "--search", "lr"]


def csv_without_category(project: Project) -> list[str]:
    (project.root / "manifest.csv").write_text("path\nvideos/pan/pan0.npy\n")
    return edit_base("data", "source", "manifest.csv")(project)


def unreadable_video(project: Project) -> list[str]:
    (project.root / "videos" / "pan" / "broken.mp4").write_bytes(b"this is not a video")
    base = project.base()
    base["data"]["num_videos"] = 100
    project.write_base(base)
    return ["plan", "--search", "lr"]


def args(*argv: str) -> Callable[[Project], list[str]]:
    return lambda project: list(argv)


def not_a_database(project: Project) -> list[str]:
    garbage = project.root / "garbage.db"
    garbage.write_bytes(b"definitely not SQLite " * 100)
    return ["--db", str(garbage), "status"]


CASES = {
    "unknown key": (edit_base("data", "num_vidoes", 20), "data.num_vidoes"),
    "wrong type": (edit_base("data", "num_videos", "twenty"), "data.num_videos must be an integer"),
    "negative lr": (edit_base("baseline", "lr", -0.1), "baseline.lr must be > 0"),
    "negative steps": (edit_base("baseline", "finetune_steps", -3), "baseline.finetune_steps"),
    "too many condition frames": (edit_base("baseline", "condition_frames", 12), "condition_frames is 12"),
    "empty values": (edit_search("values", []), "values is empty"),
    "parameter baseline lacks": (edit_search("parameter", "momentum"), "does not have"),
    "malformed yaml": (raw_yaml, "not valid YAML"),
    "unknown search": (args("plan", "--search", "dropout"), "no configs/dropout_search.yaml"),
    "missing video folder": (missing_source, "no/such/folder"),
    "video too short": (short_video, "short"),
    "unreadable video": (unreadable_video, "broken.mp4"),
    "manifest without category": (csv_without_category, "category"),
    "wrong flag": (args("plan", "--serach", "lr"), "--serach"),
    "bad flag value": (args("submit", "--local", "--workers", "0"), "--workers"),
    "missing required flag": (args("plan"), "--search"),
    "unknown command": (args("plann"), "plann"),
    "unreachable postgres": (args("--db", "postgresql://nobody@127.0.0.1:9/none", "status"), "127.0.0.1"),
    "not a database url": (args("--db", "mysql+nosuchdriver://x/y", "status"), "--db"),
    "file that is not a database": (not_a_database, "not an SQLite database"),
    "missing config dir": (args("--config-dir", "nowhere", "plan", "--search", "lr"), "nowhere"),
    "no database yet": (args("--db", "fresh.db", "status"), "hparray plan"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_and_changes_nothing(make_project, case: str) -> None:
    project: Project = make_project()
    planned = project.run("plan", "--search", "lr")
    assert planned.returncode == 0, planned.stderr
    before = dump(project.db)
    breaker, expected = CASES[case]
    argv = breaker(project)
    result = project.run(*argv, timeout=120)
    assert result.returncode != 0, f"{case}: exit 0\n{result.stdout}"
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"{case}: expected one line, got:\n{result.stderr}"
    assert lines[0].startswith("error: ") and expected in lines[0], lines[0]
    assert "Traceback" not in result.stderr + result.stdout
    assert dump(project.db) == before
    assert not (project.root / "fresh.db").exists()


def test_verbose_shows_the_traceback(make_project) -> None:
    project: Project = make_project()
    result = project.run("--verbose", "--db", "postgresql://nobody@127.0.0.1:9/none", "status")
    assert result.returncode == 2
    assert "Traceback" in result.stderr


def test_locked_database_is_one_line(make_project) -> None:
    """A results.db locked by another process for longer than the busy timeout."""
    import subprocess
    import sys
    project: Project = make_project()
    assert project.run("plan", "--search", "lr").returncode == 0
    before = dump(project.db)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sqlite3, sys, time\n"
        f"c = sqlite3.connect({str(project.db)!r}, isolation_level=None)\n"
        "c.execute('BEGIN EXCLUSIVE'); print('locked', flush=True); time.sleep(60)\n")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        result = project.run("reap", env={"HPARRAY_SQLITE_BUSY_TIMEOUT_S": "1"}, timeout=120)
    finally:
        holder.kill()
        holder.wait()
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "locked" in lines[0], result.stderr
    assert dump(project.db) == before


# ---------------------------------------------------------------- runners that could never start


def unimportable_runner(project: Project) -> None:
    base = project.base()
    base["runner"] = {"name": "nosuchpkg.mod:Klass"}
    project.write_base(base)


def missing_executable(project: Project) -> None:
    base = project.base()
    base["runner"] = {"name": "command", "command": ["/no/such/predict", "{video}", "{output_dir}"]}
    project.write_base(base)


def not_a_checkpoint(project: Project) -> None:
    (project.root / "not-a-checkpoint").mkdir()
    base = project.base()
    base["runner"] = {"name": "ltx"}
    base["model"] = {"path": str(project.root / "not-a-checkpoint")}
    project.write_base(base)


RUNNER_CASES = {
    "unimportable runner": (unimportable_runner, "nosuchpkg"),
    "missing executable": (missing_executable, "/no/such/predict"),
    "model.path not a checkpoint": (not_a_checkpoint, "model_index.json"),
}


@pytest.mark.parametrize("command", ["plan", "submit"])
@pytest.mark.parametrize("case", list(RUNNER_CASES))
def test_a_runner_that_cannot_start_is_refused_before_anything_runs(make_project, case: str, command: str) -> None:
    project: Project = make_project()
    breaker, expected = RUNNER_CASES[case]
    if command == "submit":
        assert project.run("plan", "--search", "lr").returncode == 0
    breaker(project)
    before = dump(project.db)
    argv = ["plan", "--search", "lr"] if command == "plan" else ["submit", "--local", "--workers", "1"]
    result = project.run(*argv, timeout=120)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stdout + result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.stderr
    assert dump(project.db) == before
    assert not (project.root / "results" / "logs").exists(), "a worker was started"
