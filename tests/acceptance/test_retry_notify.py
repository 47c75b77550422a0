"""`hparray retry` and `notify:` through the CLI, with real worker processes.

Retry: a failed un-fine-tuned row (its fine-tune row blocked behind it) and a diverged row go back
to pending with fresh budgets and run again, keeping every earlier attempt; a row that is running
while `retry` runs stays exactly as it was; the report says which rows were retried. Notify: three
workers finishing one sweep together send one "sweep complete" message, a row that fails for good
sends one, and quotes, `;` and `$(...)` in the command's argv and in the summary arrive intact
(no shell in between). Every wait is on an event with a deadline, never a guess of a duration.
"""

from __future__ import annotations

import csv
import json
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from hparray import notify
from hparray.store import Store
from tests.acceptance.test_workers import Workers, hold_folder, plan, rows, wait_for
from tests.conftest import REPO, Project

SINK = REPO / "tests" / "support" / "notify_sink.py"
PAN, ZOOM = "pan__pan0", "zoom__zoom0"  # video names are <category>__<file>


@pytest.fixture
def group(tmp_path: Path) -> Iterator[Callable[[Project], Workers]]:
    made: list[Workers] = []

    def make(project: Project) -> Workers:
        made.append(Workers(project, tmp_path / f"logs{len(made)}", None))
        return made[-1]

    yield make
    for workers in made:
        workers.kill_all()


def statuses(store: Store) -> dict[tuple[str, str], str]:
    return {(r.kind, r.video): r.status for r in rows(store, "SELECT kind, video, status FROM tasks")}


def outcomes(store: Store, kind: str, video: str) -> list[str]:
    return [r.outcome for r in rows(store, "SELECT a.outcome FROM attempts AS a JOIN tasks AS t ON t.id = a.task_id "
                                           "WHERE t.kind = :k AND t.video = :v ORDER BY a.id", k=kind, v=video)]


def ok(done: Any) -> str:
    """The output of a command that succeeded, with rich's line wrapping undone."""
    assert done.returncode == 0, done.stdout + done.stderr
    return " ".join(str(done.stdout).split())


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_retry_brings_back_failed_diverged_and_blocked_rows_and_leaves_a_running_row_alone(
        make_project: Callable[..., Project], group: Callable[[Project], Workers], tmp_path: Path) -> None:
    project = make_project(categories=("pan", "zoom"), per_category=1, lr_values=[1e-5],
                           **{"data.num_videos": 2, "tasks.max_attempts": 2})
    store = plan(project)
    # pan's un-fine-tuned row fails twice (failed for good; pan's fine-tune row blocked behind it),
    # zoom's fine-tune row diverges.
    ok(project.run("worker", env={"HPARRAY_TEST_FAIL": PAN, "HPARRAY_TEST_DIVERGE": ZOOM}))
    assert statuses(store) == {("baseline", PAN): "failed", ("finetune", PAN): "pending",
                               ("baseline", ZOOM): "done", ("finetune", ZOOM): "diverged"}

    for flag, name in (("--config", "lr_9e-9"), ("--video", "pan__pan9"), ("--search", "steps")):
        refused = project.run("retry", flag, name)
        assert refused.returncode == 2, refused.stdout + refused.stderr
        assert refused.stderr.startswith(f"error: retry {flag} {name}: no ") and refused.stderr.count("\n") == 1

    preview = ok(project.run("retry", "--failed", "--diverged", "--dry-run"))
    assert "would retry" in preview and "no_finetune_cf_4" in preview and "waits on #" in preview, preview
    assert "would put 2 rows (1 diverged, 1 failed) back to pending" in preview and "Nothing changed" in preview
    assert statuses(store)[("baseline", PAN)] == "failed"

    # Failed rows by default: the diverged row is left for later.
    assert "retried 1 row (1 failed)" in ok(project.run("retry"))
    assert statuses(store)[("baseline", PAN)] == "pending" and statuses(store)[("finetune", ZOOM)] == "diverged"

    hold = hold_folder(tmp_path)
    workers = group(project)
    worker = workers.start("worker", env={"HPARRAY_TEST_HOLD": str(hold)})
    held = wait_for("the retried row to be running", lambda: rows(
        store, "SELECT id, status, lease, attempts, errors, worker_id, claimed_at FROM tasks "
               "WHERE kind = 'baseline' AND video = :v AND status = 'running'", v=PAN), 300)[0]
    assert (held.attempts, held.errors) == (3, 0)  # attempts keep counting; the error budget is fresh

    retried = ok(project.run("retry", "--diverged", "--failed", "--video", PAN, "--video", ZOOM))
    assert "retried 1 row (1 diverged)" in retried and "left alone: 1 row matching the filters, running" in retried
    assert rows(store, "SELECT id, status, lease, attempts, errors, worker_id, claimed_at FROM tasks "
                       "WHERE id = :id", id=held.id) == [held]

    (hold / "go").touch()
    assert worker.wait(timeout=300) == 0, workers.output()
    assert set(statuses(store).values()) == {"done"}
    assert outcomes(store, "baseline", PAN) == ["error", "error", "done"]
    assert outcomes(store, "finetune", ZOOM) == ["diverged", "done"]
    assert outcomes(store, "finetune", PAN) == ["done"]
    assert rows(store, "SELECT COUNT(*) AS n FROM events WHERE kind = 'retried'")[0].n == 2

    shown = ok(project.run("report", timeout=600))
    assert "2 rows were retried" in shown, shown
    out = project.root / "results"
    assert json.loads((out / "summary.json").read_text())["rows"]["retried"] == 2
    assert '<span id="retried">2 rows were retried' in (out / "report.html").read_text()
    with open(out / "per_video.csv", newline="") as fh:
        retries = {(r["kind"], r["video"]): r["retried"] for r in csv.DictReader(fh)}
    assert retries == {("baseline", PAN): "1", ("finetune", PAN): "0", ("baseline", ZOOM): "0", ("finetune", ZOOM): "1"}
    store.close()


def messages(inbox: Path) -> list[dict[str, Any]]:
    return [json.loads(path.read_text()) for path in sorted(inbox.glob("msg-*.json"))]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_three_workers_finishing_together_send_one_message_and_a_row_failing_for_good_one(
        make_project: Callable[..., Project], group: Callable[[Project], Workers], tmp_path: Path) -> None:
    inbox, hold, asking = tmp_path / "inbox", hold_folder(tmp_path), tmp_path / "asking"
    inbox.mkdir()
    asking.mkdir()
    hostile_arg = f"it's \"quoted\"; $(touch {tmp_path}/pwned-argv) `touch {tmp_path}/pwned-tick` && echo x | cat"
    hostile_note = f" -- it's \"bad\"; $(touch {tmp_path}/pwned-summary); rm -rf '{tmp_path}/nothing' \\ \n second line"
    project = make_project(categories=("pan", "zoom"), per_category=2, lr_values=[1e-6, 1e-5],
                           **{"data.num_videos": 4, "tasks.max_attempts": 1,  # (while every worker holds a row)
                              "notify": [sys.executable, str(SINK), str(inbox), hostile_arg]})
    store = plan(project)
    env = {"HPARRAY_TEST_HOLD": str(hold), "HPARRAY_TEST_FAIL": "pan__pan1", "HPARRAY_TEST_FAIL_NOTE": hostile_note,
           notify.HOLD_ENV: str(asking)}
    workers = group(project)
    for _ in range(3):
        workers.start("worker", env=env)
    # Every task waits for `go`: all three workers hold a row at once.
    wait_for("three rows running", lambda: rows(store, "SELECT COUNT(*) AS n FROM tasks "
                                                       "WHERE status = 'running'")[0].n == 3, 300)
    wait_for("the failing row to fail for good", lambda: statuses(store)[("baseline", "pan__pan1")] == "failed", 300)
    (hold / "go").touch()
    # Each worker, out of work, waits to ask whether the sweep is complete: all three ask at once.
    wait_for("three workers about to ask", lambda: len(list(asking.glob("ready-*"))) == 3, 300)
    (asking / "go").touch()
    assert workers.wait_all(stall_s=180, limit_s=600) == [0, 0, 0], workers.output()[-4000:]
    assert len(re.findall(r"stopped after \d+ s: nothing left to claim", workers.output())) == 3  # all three asked

    got = messages(inbox)
    assert sorted(m["event"] for m in got) == ["row_failed", "sweep_complete"], got
    error = f"RuntimeError: test failure for pan__pan1{hostile_note}"
    for message in got:
        assert message["argv"] == [hostile_arg]
        assert message["stdin"]["event"] == message["event"]
    complete = next(m["stdin"] for m in got if m["event"] == "sweep_complete")
    assert (complete["rows"]["total"], complete["rows"]["done"], complete["rows"]["failed"],
            complete["rows"]["blocked"]) == (12, 9, 1, 2)
    assert [(f["video"], f["kind"], f["error"]) for f in complete["failed"]] == [("pan__pan1", "baseline", error)]
    assert complete["sender"] in {r.id for r in rows(store, "SELECT id FROM workers")}
    assert complete["elapsed_s"] > 0 and complete["report"].endswith(" report")
    failed = next(m["stdin"] for m in got if m["event"] == "row_failed")
    assert (failed["row"]["video"], failed["row"]["config_name"], failed["row"]["error"]) == (
        "pan__pan1", "no_finetune_cf_4", error)
    assert failed["message"].startswith("row no_finetune_cf_4 pan__pan1 failed for good: RuntimeError: test failure")
    assert not list(tmp_path.glob("pwned-*")), "a shell ran part of the notify argv or the summary"

    # More work, run to the end (here by `submit --local`): one more completion message, no other.
    ok(project.run("retry"))
    ok(project.run("submit", "--local", "--workers", "1", timeout=600))
    got = messages(inbox)
    assert sorted(m["event"] for m in got) == ["row_failed", "sweep_complete", "sweep_complete"], got
    assert messages(inbox)[-1]["stdin"]["rows"]["done"] == 12
    assert rows(store, "SELECT COUNT(*) AS n FROM notifications")[0].n == 3
    store.close()
