"""What the commands say when a sweep is not simply going well: failed rows and the rows behind
them, a report on a full disk, a progress bar while rows are added."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from tests.conftest import Project


@pytest.fixture
def failed_sweep(make_project) -> Project:
    """pan__pan0's un-fine-tuned row fails every attempt: it fails for good, its 3 fine-tune rows wait."""
    project: Project = make_project(per_category=2)
    assert project.run("plan", "--search", "lr").returncode == 0
    ran = project.run("submit", "--local", "--workers", "1", env={"HPARRAY_TEST_FAIL": "pan__pan0"}, timeout=600)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    return project


def test_submit_says_what_waits_behind_failed_rows(failed_sweep: Project) -> None:
    again = failed_sweep.run("submit", "--local", "--workers", "1")
    assert again.returncode == 0, again.stderr
    said = " ".join(again.stdout.split())
    assert "every planned row is finished" not in said
    assert "1 rows failed for good and 3 more wait behind" in said and "hparray retry --failed" in said


def test_status_shows_why_rows_failed_and_its_eta_leaves_blocked_rows_out(failed_sweep: Project) -> None:
    status = failed_sweep.run("status")
    assert status.returncode == 0, status.stderr
    assert "failed rows" in status.stdout and "test failure for pan__pan0" in status.stdout
    state = json.loads(failed_sweep.run("status", "--json").stdout)
    assert (state["failed"], state["blocked"], state["pending"]) == (1, 3, 3)
    assert state["eta_s"] == 0, state["eta_s"]  # the 3 pending rows cannot run before a retry
    assert state["failed_rows"][0]["error"].startswith("RuntimeError: test failure for pan__pan0")


@pytest.fixture
def tiny_disk(tmp_path: Path):
    """A 96 KiB tmpfs: room for the JSON files, not for the plots."""
    mount = tmp_path / "tiny-disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here to fill it: {made.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_a_report_on_a_full_disk_names_the_file_it_could_not_write(failed_sweep: Project, tiny_disk: Path) -> None:
    filler = tiny_disk / "filler"
    with open(filler, "wb") as fh:  # leave ~16 KiB: the first plot does not fit
        fh.write(b"\0" * (80 * 1024))
    result = failed_sweep.run("report", "--out", str(tiny_disk / "report"))
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 1, result.stdout + result.stderr
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert re.search(rf"cannot write {re.escape(str(tiny_disk))}/report/\S+ \(No space left on device\)", lines[0])


def test_the_progress_bar_counts_rows_planned_while_it_runs(make_project, tmp_path: Path) -> None:
    project: Project = make_project(per_category=1)
    assert project.run("plan", "--search", "lr").returncode == 0  # 2 videos x 4 rows
    project.write_search("steps", "finetune_steps", [1, 3])
    hold = tmp_path / "hold"
    hold.mkdir()
    submit = project.popen("submit", "--local", "--workers", "1", env={"HPARRAY_TEST_HOLD": str(hold)},
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        more = project.run("plan", "--search", "steps")  # while the first task holds
        assert more.returncode == 0, more.stderr
        (hold / "go").touch()
        out, err = submit.communicate(timeout=600)
    finally:
        if submit.poll() is None:
            submit.kill()
    assert submit.returncode == 0, out + err
    bars = re.findall(r"sweep\b.*?(\d+)/(\d+)", out)
    assert bars, out
    done, total = map(int, bars[-1])
    assert done == total == 12, out  # 8 rows + 4 planned later (2 videos x 2 steps values)
