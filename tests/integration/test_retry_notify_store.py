"""The store's side of `hparray retry` and `notify:` (migration 0005), the same on SQLite and
PostgreSQL: retried rows go back to pending with fresh budgets in one transaction and keep every
attempt, a running row is never touched, names not in the sweep are refused, and each notify event
(the sweep complete, a row failed for good) is won by exactly one of the callers that see it.

Time is driven through `now` (from T0); rows come from real plans, as `hparray plan` writes them.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from hparray.environment import this_host
from hparray.errors import BadInput
from hparray.plan import Plan
from hparray.store import Store
from hparray.store import notifications as marks
from hparray.store.retry import RetrySelection, retried_counts, retry
from hparray.tasks import ClaimedTask, TaskOutcome
from tests.conftest import Project
from tests.integration.test_store_contract import T0, apply, done, make_plan, rows, task_row

BOTH = ("failed", "diverged")


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    opened = Store.open(db_url)
    opened.register_worker("w1", this_host(), 1, T0)
    yield opened
    opened.close()


@pytest.fixture
def two_videos(make_project: Callable[..., Project]) -> Plan:
    """Two videos, one lr: two un-fine-tuned rows and a fine-tune row waiting on each."""
    return make_plan(make_project(categories=("pan",), per_category=2, lr_values=[1e-5], **{"data.num_videos": 2}))


def run_all(store: Store, outcome: Callable[[ClaimedTask], str], now: float) -> None:
    """Claim until nothing is claimable; `outcome(task)` says 'done', 'diverged' or 'error'."""
    while (task := store.claim("w1", now)) is not None:
        result = outcome(task)
        if result == "error":
            store.fail(task, f"RuntimeError: boom on {task.video}", "Traceback ...", now)
        else:
            assert store.finish(task, TaskOutcome(status=result) if result == "diverged" else done(), now)
        now += 1


def sweep_with_a_failed_baseline_and_a_diverged_row(store: Store, plan: Plan) -> dict[str, Any]:
    """video 0's un-fine-tuned row fails for good (its fine-tune row is blocked); video 1's fine-tune
    row diverges. Returns the rows by role."""
    apply(store, plan, max_attempts=2)
    first, second = (v.name for v in plan.videos)
    run_all(store, lambda t: "error" if t.video == first else ("diverged" if t.kind == "finetune" else "done"), T0)
    by = {(r.kind, r.video): r for r in rows(store, "SELECT id, kind, video, status FROM tasks")}
    roles = {"failed": by[("baseline", first)], "blocked": by[("finetune", first)],
             "diverged": by[("finetune", second)], "done": by[("baseline", second)]}
    assert [roles[k].status for k in ("failed", "blocked", "diverged", "done")] == [
        "failed", "pending", "diverged", "done"]
    return roles


def test_retry_puts_failed_and_diverged_rows_back_with_fresh_budgets_and_keeps_every_attempt(
        store: Store, two_videos: Plan) -> None:
    roles = sweep_with_a_failed_baseline_and_a_diverged_row(store, two_videos)
    failed, blocked, diverged = roles["failed"].id, roles["blocked"].id, roles["diverged"].id
    assert store.task_counts().blocked == 1

    preview = retry(store, RetrySelection(statuses=BOTH), T0 + 100, dry_run=True)
    assert [r.id for r in preview.retried] == [failed, diverged] and [r.id for r in preview.unblocked] == [blocked]
    assert task_row(store, failed).status == "failed"  # a dry run changes nothing

    report = retry(store, RetrySelection(statuses=BOTH), T0 + 100)
    assert {r.id: r.status for r in report.retried} == {failed: "failed", diverged: "diverged"}
    assert [(r.id, r.waits_on) for r in report.unblocked] == [(blocked, failed)]
    row = task_row(store, failed)
    assert (row.status, row.errors, row.losses, row.attempts, row.error, row.finished_at) == (
        "pending", 0, 0, 2, None, None)
    assert task_row(store, diverged).status == "pending"
    assert rows(store, "SELECT COUNT(*) AS n FROM results WHERE task_id = :id", id=diverged)[0].n == 0
    assert store.task_counts().blocked == 0
    events = rows(store, "SELECT task_id, message FROM events WHERE kind = 'retried' ORDER BY task_id")
    assert [e.task_id for e in events] == [failed, diverged] and "failed after 2 attempts" in events[0].message
    assert retried_counts(store) == {failed: 1, diverged: 1}

    # Fresh budgets: the row gets max_attempts again; the next attempt's number follows the last.
    task = store.claim("w1", T0 + 200)
    assert task is not None and task.id == failed and task.attempt == 3
    assert store.fail(task, "RuntimeError: again", "Traceback ...", T0 + 201) == "pending"
    run_all(store, lambda t: "done", T0 + 300)
    assert {r.status for r in rows(store, "SELECT status FROM tasks")} == {"done"}
    outcomes = [a.outcome for a in rows(store, "SELECT outcome FROM attempts WHERE task_id = :id ORDER BY id",
                                        id=failed)]
    assert outcomes == ["error", "error", "error", "done"]
    assert [a.outcome for a in rows(store, "SELECT outcome FROM attempts WHERE task_id = :id ORDER BY id",
                                    id=diverged)] == ["diverged", "done"]


def test_filters_narrow_the_retry_and_a_blocked_row_brings_back_the_row_it_waits_on(
        store: Store, two_videos: Plan) -> None:
    roles = sweep_with_a_failed_baseline_and_a_diverged_row(store, two_videos)
    first, second = (v.name for v in two_videos.videos)
    # The default is failed rows only: the diverged one stays as it is.
    assert [r.id for r in retry(store, RetrySelection(), T0, dry_run=True).retried] == [roles["failed"].id]
    assert retry(store, RetrySelection(statuses=("diverged",), videos=(first,)), T0, dry_run=True).retried == []
    # The blocked fine-tune row matches lr_1e-5; the failed un-fine-tuned row it waits on comes with it.
    picked = retry(store, RetrySelection(configs=("lr_1e-5",)), T0, dry_run=True)
    assert [(r.id, r.config) for r in picked.retried] == [(roles["failed"].id, "no_finetune_cf_4")]
    assert picked.retried[0].reason == "failed; 1 matching row waits on it"
    # The un-fine-tuned row by its own name, and by the name `plan` shows it under.
    for name in ("no_finetune_cf_4", "baseline_cf_4"):
        assert [r.id for r in retry(store, RetrySelection(configs=(name,)), T0, dry_run=True).retried] == [
            roles["failed"].id]
    by_search = retry(store, RetrySelection(statuses=BOTH, searches=("lr",), videos=(second,)), T0)
    assert [r.id for r in by_search.retried] == [roles["diverged"].id]
    assert task_row(store, roles["failed"].id).status == "failed"


def test_retry_refuses_names_that_are_not_in_the_sweep(store: Store, two_videos: Plan) -> None:
    sweep_with_a_failed_baseline_and_a_diverged_row(store, two_videos)
    with pytest.raises(BadInput, match=r"retry --config lr_1e-9: no config of that name .*did you mean"):
        retry(store, RetrySelection(configs=("lr_1e-9",)), T0)
    with pytest.raises(BadInput, match=r"retry --video nope: no video of that name"):
        retry(store, RetrySelection(videos=("nope",)), T0)
    with pytest.raises(BadInput, match=r"retry --search steps: no search of that name"):
        retry(store, RetrySelection(searches=("steps",)), T0)
    assert rows(store, "SELECT COUNT(*) AS n FROM events WHERE kind = 'retried'")[0].n == 0


def test_a_running_row_is_never_touched(store: Store, two_videos: Plan) -> None:
    apply(store, two_videos, max_attempts=1)
    held = store.claim("w1", T0)
    assert held is not None
    other = store.claim("w1", T0)
    assert other is not None and store.fail(other, "RuntimeError: boom", "", T0) == "failed"
    before = task_row(store, held.id)
    report = retry(store, RetrySelection(statuses=BOTH, videos=(held.video, other.video)), T0 + 1)
    assert [r.id for r in report.retried] == [other.id] and [r.id for r in report.running] == [held.id]
    assert task_row(store, held.id) == before
    assert store.finish(held, done(), T0 + 2)  # its lease still holds


def race(n: int, call: Callable[[int], bool]) -> list[bool]:
    """`call(i)` from n threads released at once; their answers."""
    gate, answers = threading.Barrier(n), [False] * n

    def run(i: int) -> None:
        gate.wait()
        answers[i] = call(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    return answers


def test_each_completion_and_each_final_failure_is_won_by_exactly_one_caller(store: Store, two_videos: Plan) -> None:
    apply(store, two_videos, max_attempts=1)
    assert not marks.claim_sweep_complete(store, "early", T0)  # rows are pending
    first = two_videos.videos[0].name
    run_all(store, lambda t: "error" if t.video == first else "done", T0)
    failed = rows(store, "SELECT id FROM tasks WHERE status = 'failed'")[0].id
    assert sum(race(6, lambda i: marks.claim_sweep_complete(store, f"w{i}", T0 + 10))) == 1
    assert not marks.claim_sweep_complete(store, "late", T0 + 11)
    assert sum(race(4, lambda i: marks.claim_row_failed(store, failed, f"w{i}", T0 + 10))) == 1
    assert not marks.claim_row_failed(store, failed, "late", T0 + 11)

    # More work (a retry here; a plan or resumed rows alike), run to the end: a new completion, and
    # a retried row that fails again is a new failure.
    retry(store, RetrySelection(), T0 + 20)
    assert not marks.claim_sweep_complete(store, "while pending", T0 + 21)
    run_all(store, lambda t: "error", T0 + 30)
    assert task_row(store, failed).status == "failed"
    assert marks.claim_row_failed(store, failed, "w1", T0 + 40)
    assert marks.claim_sweep_complete(store, "w1", T0 + 40)
    assert not marks.claim_sweep_complete(store, "w2", T0 + 41)
    sent = rows(store, "SELECT key, kind, task_id, sender FROM notifications ORDER BY sent_at, key")
    assert [s.kind for s in sent].count("sweep_complete") == 2 and [s.kind for s in sent].count("row_failed") == 2
    assert marks.failed_row(store, failed) is not None and marks.sweep_span(store)[0] == T0
