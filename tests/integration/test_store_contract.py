"""The store's contract, the same on SQLite and PostgreSQL: migrations, claim order and
dependencies, leases and fencing, heartbeats, the reaper, retries, releases and idempotent plans.

Time is driven through the `now` argument (from T0), never by sleeping. Rows come from real
plans (make_project -> load_sweep -> select_videos -> build_plan), as `hparray plan` writes them.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import inspect, text

from hparray.config import load_sweep
from hparray.environment import this_host
from hparray.plan import Plan, build_plan, select_videos
from hparray.store import Store, migration_files
from hparray.tasks import ClaimedTask, TaskOutcome
from tests.conftest import Project, subprocess_env

T0 = 1_000_000.0
GRACE_S = 30.0
MIGRATIONS = migration_files()
TABLES = {"configs", "search_configs", "videos", "tasks", "attempts", "results", "workers", "submissions",
          "events", "schema_migrations", "notifications"}


def make_plan(project: Project) -> Plan:
    """The plan `hparray plan --search lr` would write, run from anywhere (the source made absolute)."""
    base = project.base()
    base["data"]["source"] = str(project.root / "videos")
    project.write_base(base)
    sweep = load_sweep(project.config_dir)
    return build_plan(sweep, "lr", select_videos(sweep.settings))


def apply(store: Store, plan: Plan, max_attempts: int = 3, now: float = T0) -> Any:
    return store.apply_plan(plan.config_rows(), plan.search_config_rows(), plan.video_rows(), plan.tasks,
                            max_attempts, now)


def rows(store: Store, sql: str, **params: Any) -> list[Any]:
    with store.engine.connect() as conn:
        return list(conn.execute(text(sql), params))


def one(store: Store, sql: str, **params: Any) -> Any:
    found = rows(store, sql, **params)
    assert len(found) == 1, found
    return found[0]


def task_row(store: Store, task_id: int) -> Any:
    return one(store, "SELECT * FROM tasks WHERE id = :id", id=task_id)


def attempt_row(store: Store, lease: str) -> Any:
    return one(store, "SELECT * FROM attempts WHERE lease = :lease", lease=lease)


def done(psnr: float = 30.0) -> TaskOutcome:
    return TaskOutcome(status="done", metrics={"psnr": psnr}, timings_s={"wall": 1.0})


@pytest.fixture
def one_video(make_project: Callable[..., Project]) -> Plan:
    """One video, one lr: a baseline row and the fine-tune row that depends on it."""
    return make_plan(make_project(categories=("pan",), per_category=1, lr_values=[1e-5],
                                  **{"data.num_videos": 1}))


@pytest.fixture
def worker(store: Store) -> str:
    """Two workers on this host: the reaper (this host too, by default) judges them on one clock."""
    store.register_worker("w1", this_host(), 1, T0)
    store.register_worker("w2", this_host(), 2, T0)
    return "w1"


# ---------------------------------------------------------------- migrations


def test_migrations_apply_record_their_version_and_reopening_is_a_no_op(store: Store, one_video: Plan) -> None:
    assert store.schema_version() == int(MIGRATIONS[-1].name[:4])
    recorded = rows(store, "SELECT version, name, applied_at FROM schema_migrations ORDER BY version")
    expected = [(int(f.name[:4]), f.name.removesuffix(".sql")) for f in MIGRATIONS]
    assert [(r.version, r.name) for r in recorded] == expected
    assert TABLES <= set(inspect(store.engine).get_table_names())
    apply(store, one_video)

    again = Store.open(store.url)
    try:
        assert again.schema_version() == store.schema_version()
        assert rows(again, "SELECT version, name, applied_at FROM schema_migrations ORDER BY version") == recorded
        assert one(again, "SELECT COUNT(*) AS n FROM tasks").n == 2  # the data survived the reopen
    finally:
        again.close()


OPEN_AT_ONCE = textwrap.dedent("""
    import logging, sys
    from hparray.store import Store
    logging.basicConfig(level=logging.WARNING, stream=sys.stdout, format="LOG %(name)s %(message)s")
    logging.getLogger("hparray.store").setLevel(logging.INFO)
    print("ready", flush=True)
    sys.stdin.readline()
    store = Store.open(sys.argv[1])
    print("version", store.schema_version(), flush=True)
""")


def test_eight_processes_opening_a_fresh_database_at_once_migrate_it_exactly_once(db_url: str) -> None:
    procs = [subprocess.Popen([sys.executable, "-c", OPEN_AT_ONCE, db_url], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=subprocess_env())
             for _ in range(8)]
    try:
        for proc in procs:  # a barrier: every process has imported everything before any opens
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == "ready"
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        outputs = [proc.communicate(timeout=300)[0] for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    assert [proc.returncode for proc in procs] == [0] * 8, "\n".join(outputs)
    version = int(MIGRATIONS[-1].name[:4])
    assert all(f"version {version}" in out for out in outputs), "\n".join(outputs)
    for file in MIGRATIONS:
        applied = sum(out.count(f"applied migration {file.name}") for out in outputs)
        assert applied == 1, f"{file.name} applied {applied} times:\n" + "\n".join(outputs)
    store = Store.open(db_url)
    try:
        assert [r.version for r in rows(store, "SELECT version FROM schema_migrations ORDER BY version")] == \
            [int(f.name[:4]) for f in MIGRATIONS]
    finally:
        store.close()


# ---------------------------------------------------------------- planning


def test_applying_the_same_plan_twice_adds_nothing(store: Store, make_project: Callable[..., Project]) -> None:
    plan = make_plan(make_project())
    first = apply(store, plan)
    assert (first.new_tasks, first.existing_tasks) == (len(plan.tasks), 0) == (24, 0)
    assert first.new_configs == len(plan.configs) == 4
    task = store.claim("w", T0)
    assert task is not None and store.finish(task, done(), T0 + 1)
    before = rows(store, "SELECT * FROM tasks ORDER BY id")

    second = apply(store, plan, now=T0 + 100)
    assert (second.new_tasks, second.existing_tasks, second.new_configs) == (0, 24, 0)
    assert rows(store, "SELECT * FROM tasks ORDER BY id") == before  # finished rows untouched
    assert one(store, "SELECT COUNT(*) AS n FROM videos").n == 6
    assert one(store, "SELECT COUNT(*) AS n FROM search_configs").n == 3


# ---------------------------------------------------------------- claim order and dependencies


def test_baselines_are_claimed_first_and_a_finetune_row_waits_for_its_baseline(
        store: Store, make_project: Callable[..., Project]) -> None:
    plan = make_plan(make_project())
    apply(store, plan, max_attempts=1)
    ids = {(r.config_hash, r.video): r.id for r in rows(store, "SELECT id, config_hash, video FROM tasks")}
    videos = [v.name for v in plan.videos]

    baselines = [store.claim("w", T0) for _ in videos]
    assert all(b is not None and b.kind == "baseline" for b in baselines)
    assert [b.video for b in baselines if b] == videos
    assert [b.id for b in baselines if b] == sorted(b.id for b in baselines if b)
    assert store.claim("w", T0) is None  # every fine-tune row waits on a running baseline
    assert store.waiting_work() == 18
    by_video = {b.video: b for b in baselines if b}

    assert store.finish(by_video[videos[0]], done(), T0 + 1)
    released = [store.claim("w", T0 + 2) for _ in range(3)]
    assert all(r is not None and r.kind == "finetune" and r.video == videos[0] for r in released)
    expected = sorted(ids[(t.config_hash, t.video)] for t in plan.tasks
                      if t.kind == "finetune" and t.video == videos[0])
    assert [r.id for r in released if r] == expected
    assert store.claim("w", T0 + 2) is None

    # A baseline that fails for good blocks its fine-tune rows: never claimable, counted as blocked.
    assert store.fail(by_video[videos[1]], "RuntimeError: boom", "Traceback ...", T0 + 3) == "failed"
    for video in videos[2:]:
        assert store.finish(by_video[video], done(), T0 + 3)
    rest = []
    while (task := store.claim("w", T0 + 4)) is not None:
        rest.append(task)
    assert len(rest) == 12 and {t.video for t in rest} == set(videos[2:])
    assert store.task_counts().blocked == 3
    assert store.waiting_work() == 0
    blocked = rows(store, "SELECT status FROM tasks WHERE kind = 'finetune' AND video = :v", v=videos[1])
    assert [r.status for r in blocked] == ["pending"] * 3


def test_a_diverged_baseline_blocks_its_finetune_rows_instead_of_leaving_them_waiting(
        store: Store, one_video: Plan, worker: str) -> None:
    apply(store, one_video)
    baseline = store.claim(worker, T0)
    assert baseline is not None and baseline.kind == "baseline"
    assert store.finish(baseline, TaskOutcome(status="diverged"), T0 + 1)
    assert store.claim(worker, T0 + 2) is None  # the fine-tune row needs a 'done' baseline
    # Neither waiting (nothing will ever make it claimable) nor lost: blocked, so executors stop.
    assert (store.waiting_work(), store.task_counts().blocked) == (0, 1)


# ---------------------------------------------------------------- leases and fencing


def test_claim_records_the_attempt_and_a_finish_with_the_right_lease_counts(
        store: Store, one_video: Plan, worker: str) -> None:
    apply(store, one_video)
    task = store.claim(worker, T0)
    assert task is not None and task.attempt == 1
    row = task_row(store, task.id)
    assert (row.status, row.lease, row.worker_id, row.attempts, row.claimed_at) == \
        ("running", task.lease, worker, 1, T0)
    attempt = attempt_row(store, task.lease)
    assert (attempt.task_id, attempt.number, attempt.worker_id, attempt.outcome) == (task.id, 1, worker, None)
    assert one(store, "SELECT current_task FROM workers WHERE id = :w", w=worker).current_task == task.id

    assert store.finish(task, done(31.5), T0 + 5)
    row = task_row(store, task.id)
    assert (row.status, row.lease, row.finished_at) == ("done", None, T0 + 5)
    result = one(store, "SELECT * FROM results WHERE task_id = :id", id=task.id)
    assert (result.attempt_id, result.psnr, result.status) == (attempt.id, 31.5, "done")
    assert attempt_row(store, task.lease).outcome == "done"
    assert one(store, "SELECT tasks_done FROM workers WHERE id = :w", w=worker).tasks_done == 1


def test_writes_with_a_stale_lease_change_nothing_and_are_recorded_as_fenced(
        store: Store, one_video: Plan, worker: str) -> None:
    apply(store, one_video)
    stale = store.claim(worker, T0)
    assert stale is not None
    assert store.reap(T0 + GRACE_S + 1, GRACE_S).released == [stale.id]
    fresh = store.claim("w2", T0 + GRACE_S + 2)
    assert fresh is not None and fresh.id == stale.id and fresh.lease != stale.lease
    before = task_row(store, stale.id)

    assert store.heartbeat(stale, worker, T0 + 40) is False
    assert store.finish(stale, done(), T0 + 41) is False
    assert store.fail(stale, "RuntimeError: late", "Traceback ...", T0 + 42) is None
    assert store.release(stale, "SIGTERM received", T0 + 43) is False

    assert task_row(store, stale.id) == before  # still the fresh attempt's, untouched
    assert rows(store, "SELECT * FROM results") == []
    assert attempt_row(store, stale.lease).outcome == "fenced"
    assert attempt_row(store, fresh.lease).outcome is None
    fenced = rows(store, "SELECT message FROM events WHERE kind = 'fenced' AND lease = :l ORDER BY id",
                  l=stale.lease)
    assert [r.message.split()[0] for r in fenced] == ["heartbeat", "finish", "fail", "release"]
    assert store.finish(fresh, done(), T0 + 44)  # the row's real holder still can


def test_a_late_write_after_the_row_is_done_is_fenced_and_keeps_the_result(
        store: Store, one_video: Plan, worker: str) -> None:
    apply(store, one_video)
    stale = store.claim(worker, T0)
    assert stale is not None
    store.reap(T0 + GRACE_S + 1, GRACE_S)
    fresh = store.claim("w2", T0 + GRACE_S + 2)
    assert fresh is not None and store.finish(fresh, done(40.0), T0 + GRACE_S + 3)

    assert store.finish(stale, done(10.0), T0 + GRACE_S + 4) is False
    result = one(store, "SELECT attempt_id, psnr FROM results WHERE task_id = :id", id=stale.id)
    assert (result.attempt_id, result.psnr) == (attempt_row(store, fresh.lease).id, 40.0)
    assert task_row(store, stale.id).status == "done"
    assert attempt_row(store, fresh.lease).outcome == "done"  # a fenced write never rewrites another attempt
    assert attempt_row(store, stale.lease).outcome == "fenced"


def test_a_finished_attempt_writing_again_is_fenced_without_rewriting_its_outcome(
        store: Store, one_video: Plan, worker: str) -> None:
    apply(store, one_video)
    task = store.claim(worker, T0)
    assert task is not None and store.finish(task, done(), T0 + 1)
    assert store.heartbeat(task, worker, T0 + 2) is False  # a beat that raced the finish
    assert store.finish(task, done(), T0 + 3) is False
    assert attempt_row(store, task.lease).outcome == "done"
    assert one(store, "SELECT COUNT(*) AS n FROM results").n == 1


# ---------------------------------------------------------------- heartbeats and the reaper


def test_heartbeat_refreshes_the_row_so_the_reaper_leaves_it(store: Store, one_video: Plan, worker: str) -> None:
    apply(store, one_video)
    task = store.claim(worker, T0)
    assert task is not None
    assert store.heartbeat(task, worker, T0 + 20)
    assert task_row(store, task.id).heartbeat_at == T0 + 20
    assert attempt_row(store, task.lease).heartbeat_at == T0 + 20
    assert one(store, "SELECT heartbeat_at FROM workers WHERE id = :w", w=worker).heartbeat_at == T0 + 20
    assert store.reap(T0 + GRACE_S + 10, GRACE_S).released == []  # would be stale without the beat
    assert task_row(store, task.id).status == "running"
    assert store.reap(T0 + 20 + GRACE_S + 1, GRACE_S).released == [task.id]


def test_the_reaper_gives_back_a_silent_row_after_the_grace_and_the_attempt_stays_spent(
        store: Store, one_video: Plan, worker: str) -> None:
    apply(store, one_video)
    task = store.claim(worker, T0)
    assert task is not None
    assert store.reap(T0 + GRACE_S - 1, GRACE_S).released == []
    assert task_row(store, task.id).status == "running"

    report = store.reap(T0 + GRACE_S + 1, GRACE_S)
    assert (report.released, report.failed) == ([task.id], [])
    row = task_row(store, task.id)
    assert (row.status, row.lease, row.worker_id, row.attempts) == ("pending", None, None, 1)
    assert "silent" in row.error
    attempt = attempt_row(store, task.lease)
    assert (attempt.outcome, attempt.ended_at) == ("reaped", T0 + GRACE_S + 1)
    assert one(store, "SELECT kind FROM events WHERE lease = :l", l=task.lease).kind == "reaped"
    assert one(store, "SELECT state FROM workers WHERE id = :w", w=worker).state == "lost"
    again = store.claim("w2", T0 + GRACE_S + 2)
    assert again is not None and again.id == task.id and again.attempt == 2


def test_rows_of_gone_workers_are_reaped_at_once(store: Store, one_video: Plan, worker: str) -> None:
    apply(store, one_video)
    task = store.claim(worker, T0)
    assert task is not None
    assert store.reap(T0 + 1, GRACE_S, gone_workers=["w2"]).released == []  # not the holder
    assert store.reap(T0 + 1, GRACE_S, gone_workers=[worker]).released == [task.id]
    row = task_row(store, task.id)
    assert (row.status, row.attempts) == ("pending", 1)
    assert f"worker {worker} is gone" in row.error
    assert attempt_row(store, task.lease).outcome == "reaped"
    assert one(store, "SELECT state FROM workers WHERE id = :w", w=worker).state == "lost"
    assert one(store, "SELECT state FROM workers WHERE id = 'w2'").state == "lost"


def test_reaping_the_last_allowed_loss_fails_the_row(store: Store, one_video: Plan, worker: str) -> None:
    store.apply_plan(one_video.config_rows(), one_video.search_config_rows(), one_video.video_rows(),
                     one_video.tasks, 3, T0, max_losses=1)
    task = store.claim(worker, T0)
    assert task is not None
    assert store.reap(T0 + GRACE_S + 1, GRACE_S).failed == [task.id]
    assert task_row(store, task.id).status == "failed"
    assert store.claim(worker, T0 + GRACE_S + 2) is None


# ---------------------------------------------------------------- retries and releases


def test_errors_are_retried_until_max_attempts_then_the_row_fails_with_every_traceback_kept(
        store: Store, one_video: Plan, worker: str) -> None:
    apply(store, one_video, max_attempts=3)
    statuses = []
    leases = []
    for attempt in range(1, 4):
        task = store.claim(worker, T0 + attempt)
        assert task is not None and task.kind == "baseline" and task.attempt == attempt
        leases.append(task.lease)
        statuses.append(store.fail(task, f"RuntimeError: boom {attempt}", f"Traceback: frame {attempt}",
                                   T0 + attempt + 0.5))
    assert statuses == ["pending", "pending", "failed"]
    assert store.claim(worker, T0 + 10) is None  # failed for good, and its fine-tune row is blocked
    row = task_row(store, task.id)
    assert (row.status, row.attempts, row.error, row.finished_at) == ("failed", 3, "RuntimeError: boom 3", T0 + 3.5)
    attempts = rows(store, "SELECT * FROM attempts WHERE task_id = :id ORDER BY id", id=task.id)
    assert [a.lease for a in attempts] == leases
    assert [(a.number, a.outcome, a.error, a.traceback) for a in attempts] == [
        (n, "error", f"RuntimeError: boom {n}", f"Traceback: frame {n}") for n in (1, 2, 3)]
    assert store.task_counts().blocked == 1


def test_release_gives_the_attempt_back(store: Store, one_video: Plan, worker: str) -> None:
    apply(store, one_video, max_attempts=1)
    task = store.claim(worker, T0)
    assert task is not None
    assert store.release(task, "SIGTERM received", T0 + 1)
    row = task_row(store, task.id)
    assert (row.status, row.attempts, row.lease, row.worker_id) == ("pending", 0, None, None)
    attempt = attempt_row(store, task.lease)
    assert (attempt.outcome, attempt.error, attempt.ended_at) == ("released", "SIGTERM received", T0 + 1)
    assert one(store, "SELECT kind FROM events WHERE lease = :l", l=task.lease).kind == "released"
    # With max_attempts 1 a spent attempt would leave nothing to claim: the release spent none.
    again = store.claim(worker, T0 + 2)
    assert again is not None and again.id == task.id and again.attempt == 1
    assert store.finish(again, done(), T0 + 3)


def test_a_claimed_task_carries_what_the_runner_needs(store: Store, one_video: Plan, worker: str) -> None:
    apply(store, one_video)
    task = store.claim(worker, T0)
    assert task is not None
    video = one_video.videos[0]
    baseline = next(c for c in one_video.configs if c.kind == "baseline")
    expected = ClaimedTask(id=task.id, lease=task.lease, attempt=1, max_attempts=3, kind="baseline",
                           config_hash=baseline.hash, video=video.name, video_path=video.path,
                           category=video.category, caption=video.caption,
                           video_seed=one_video.video_rows()[0]["seed"], lr=None,
                           condition_frames=baseline.hp.condition_frames, finetune_steps=None,
                           estimate_s=one_video.tasks[0].estimate_s)
    assert task == expected


# ---------------------------------------------------------------- faults: skew, losses, a stuck writer


def test_liveness_needs_no_agreement_between_the_nodes_clocks(store: Store, one_video: Plan) -> None:
    """w1 runs on a node 600 s ahead, w2 on one 600 s behind; each node's reaper judges the other's
    rows by whether their heartbeat counter moves, on its own clock."""
    ahead, behind = (lambda t: T0 + t + 600), (lambda t: T0 + t - 600)
    store.register_worker("w1", "node-a", 1, ahead(0))
    store.register_worker("w2", "node-b", 2, behind(0))
    apply(store, one_video)
    held = store.claim("w2", behind(0))  # the baseline row, held by the node behind
    assert held is not None
    for t in range(1, 4 * int(GRACE_S)):  # w2 beats every second; node-a reaps every second
        assert store.heartbeat(held, "w2", behind(t))
        report = store.reap(ahead(t), GRACE_S, observer="node-a")
        assert report.released == report.failed == [], f"a healthy row was reaped at t={t}"
    assert task_row(store, held.id).status == "running"
    # w2 falls silent: node-a, on its own clock, gives the row back one grace after the last change.
    last = 4 * int(GRACE_S)
    assert store.reap(ahead(last + GRACE_S - 2), GRACE_S, observer="node-a").released == []
    assert store.reap(ahead(last + GRACE_S + 1), GRACE_S, observer="node-a").released == [held.id]


def test_a_node_that_sees_a_row_first_waits_a_whole_grace_on_its_own_clock(store: Store, one_video: Plan) -> None:
    store.register_worker("w1", "node-a", 1, T0)
    apply(store, one_video)
    held = store.claim("w1", T0)
    assert held is not None
    # node-c's clock says hours later: its first look is only a first observation, never a verdict.
    later = T0 + 10_000
    assert store.reap(later, GRACE_S, observer="node-c").released == []
    assert store.reap(later + GRACE_S - 1, GRACE_S, observer="node-c").released == []
    assert store.reap(later + GRACE_S + 1, GRACE_S, observer="node-c").released == [held.id]


def test_losses_have_their_own_budget_so_preemptions_do_not_fail_a_row(
        store: Store, one_video: Plan, worker: str) -> None:
    apply(store, one_video, max_attempts=3)
    for n in range(1, 10):  # preempted nine times: the row never erred, so it is still worth running
        task = store.claim(worker, T0 + n)
        assert task is not None and task.kind == "baseline", f"claim {n}"
        assert store.reap(T0 + n, GRACE_S, gone_workers=[worker]).released == [task.id]
        store.register_worker(worker + f"-{n}", this_host(), n, T0 + n)
        worker = worker + f"-{n}"
    row = task_row(store, task.id)
    assert (row.status, row.errors, row.losses) == ("pending", 0, 9)
    # The tenth loss (a row that kills its worker every time, e.g. out of memory) fails it, saying so.
    task = store.claim(worker, T0 + 10)
    assert task is not None
    assert store.reap(T0 + 10, GRACE_S, gone_workers=[worker]).failed == [task.id]
    row = task_row(store, task.id)
    assert row.status == "failed" and "lost 10 times" in row.error and "out of memory" in row.error


def test_errors_spend_the_error_budget_only(store: Store, one_video: Plan, worker: str) -> None:
    apply(store, one_video, max_attempts=2)
    task = store.claim(worker, T0)
    assert task is not None
    store.reap(T0, GRACE_S, gone_workers=[worker])  # one loss
    store.register_worker("w3", this_host(), 3, T0)
    task = store.claim("w3", T0 + 1)
    assert task is not None and store.fail(task, "RuntimeError: one", "tb", T0 + 2) == "pending"
    task = store.claim("w3", T0 + 3)
    assert task is not None and store.fail(task, "RuntimeError: two", "tb", T0 + 4) == "failed"
    row = task_row(store, task.id)
    assert (row.errors, row.losses) == (2, 1)


STUCK_WRITER = textwrap.dedent("""
    import os, signal, sys
    from hparray.store import Store
    store = Store.open(sys.argv[1], create=False)
    with store._write():
        print("inside", flush=True)
        os.kill(os.getpid(), signal.SIGSTOP)
""")


@contextmanager
def stuck_writer(db_url: str) -> Iterator[subprocess.Popen[str]]:
    """Another process stopped (SIGSTOP) inside a write transaction: as under Ctrl-Z or a debugger."""
    proc = subprocess.Popen([sys.executable, "-c", STUCK_WRITER, db_url], stdout=subprocess.PIPE, text=True,
                            env=subprocess_env())
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "inside"
        yield proc
    finally:
        proc.kill()
        proc.wait()


def test_a_writer_stopped_inside_a_transaction_bounds_every_other_writer(
        store: Store, one_video: Plan, worker: str, monkeypatch) -> None:
    import threading

    from hparray.errors import StoreError
    from hparray.store import sqlite as store_module

    if store.dialect != "sqlite":
        pytest.skip("the writer lock is SQLite's")
    apply(store, one_video)
    monkeypatch.setattr(store_module, "SQLITE_BUSY_TIMEOUT_S", 1.0)
    outcome: dict[str, object] = {}

    def claim() -> None:
        try:
            outcome["task"] = store.claim(worker, T0)
        except StoreError as err:
            outcome["error"] = str(err)

    with stuck_writer(store.url):
        thread = threading.Thread(target=claim, daemon=True)
        thread.start()
        thread.join(timeout=120)
        assert not thread.is_alive(), "a claim waited on the stopped writer with no limit"
    assert "stayed locked by another process for over 1 s" in str(outcome.get("error")), outcome


FLOCK_HOLDER = textwrap.dedent("""
    import fcntl, sys, time
    fh = open(sys.argv[1], "a+")
    fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
    print("locked", flush=True)
    time.sleep(3600)
""")


def test_a_heartbeat_is_not_held_up_behind_the_writer_lock(store: Store, one_video: Plan, worker: str) -> None:
    """A process that holds the writer lock but no database lock (stopped between the two) delays no
    heartbeat: beats skip the queue, SQLite's own lock guards them."""
    import threading

    from hparray.store.sqlite import WriterLock

    if store.dialect != "sqlite":
        pytest.skip("the writer lock is SQLite's")
    apply(store, one_video)
    task = store.claim(worker, T0)
    assert task is not None
    lock_file = WriterLock.for_database(Path(store.url.removeprefix("sqlite:///"))).path
    holder = subprocess.Popen([sys.executable, "-c", FLOCK_HOLDER, str(lock_file)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        beat: dict[str, object] = {}
        thread = threading.Thread(target=lambda: beat.update(ok=store.heartbeat(task, worker, T0 + 1)), daemon=True)
        thread.start()
        thread.join(timeout=120)
        assert beat.get("ok") is True, "the heartbeat waited behind the writer lock"
    finally:
        holder.kill()
        holder.wait()


def test_a_database_migrated_from_v1_equals_a_fresh_one_and_keeps_its_rows(tmp_path) -> None:
    """A sweep started before 0002 (no liveness, one attempt budget): migrated in place, its schema
    is the fresh one's and its spent attempts are split into errors and losses."""
    import sqlite3

    from hparray.store.queries import split_sql

    old = tmp_path / "old.db"
    with sqlite3.connect(old) as conn:
        first = MIGRATIONS[0]
        for statement in split_sql(first.read_text().replace("{{SERIAL_PK}}", "INTEGER PRIMARY KEY")):
            conn.execute(statement)
        conn.execute("CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL, "
                     "applied_at DOUBLE PRECISION NOT NULL)")
        conn.execute("INSERT INTO schema_migrations VALUES (1, ?, 0)", (first.name.removesuffix(".sql"),))
        conn.execute("INSERT INTO configs VALUES ('c', 'baseline', NULL, 4, NULL, '{}', 0)")
        conn.execute("INSERT INTO videos VALUES ('v', '/v.npy', 'pan', NULL, 1)")
        conn.execute("INSERT INTO tasks (config_hash, video, kind, max_attempts, estimate_s, created_at, attempts) "
                     "VALUES ('c', 'v', 'baseline', 3, 1.0, 0, 3)")
        for n, outcome in enumerate(("error", "reaped", "fenced"), 1):
            conn.execute("INSERT INTO attempts (task_id, lease, number, worker_id, started_at, outcome) "
                         "VALUES (1, ?, ?, 'w', 0, ?)", (f"l{n}", n, outcome))
    migrated, fresh = Store.open(str(old)), Store.open(str(tmp_path / "fresh.db"))
    try:
        def schema(store: Store) -> dict[str, Any]:
            tables = sorted(inspect(store.engine).get_table_names())
            return {t: ([(c[1], c[2], c[3], c[4]) for c in rows(store, f"PRAGMA table_info({t})")],
                        sorted(r[1] for r in rows(store, f"PRAGMA index_list({t})"))) for t in tables}

        assert schema(migrated) == schema(fresh)
        assert migrated.schema_version() == fresh.schema_version() == int(MIGRATIONS[-1].name[:4])
        task = one(migrated, "SELECT errors, losses, attempts FROM tasks WHERE id = 1")
        assert (task.errors, task.losses, task.attempts) == (1, 2, 3)
    finally:
        migrated.close()
        fresh.close()
