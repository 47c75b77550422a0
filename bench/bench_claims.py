"""Claim throughput and fairness: N worker processes, started together, claim -> finish no-op
tasks until the table is empty.

Rows, measured in one run so they can be compared:
  hparray sqlite wal       hparray's Store, SQLite in WAL mode (its default on a local disk)
  hparray sqlite rollback  the same with HPARRAY_SQLITE_JOURNAL=delete (its mode on NFS/Lustre/GPFS)
  hparray postgresql       the same Store on a throw-away PostgreSQL server (tests/pg.py)
  raw sqlite3 rollback     the floor: a bare sqlite3 loop, one persistent connection per process,
                           BEGIN IMMEDIATE; <the same claim statement> RETURNING; COMMIT, then a
                           one-statement finish; same schema, index, journal and synchronous=NORMAL
  optuna sqlite            Optuna's RDBStorage on SQLite: enqueue_trial per task, then ask()/tell()
  (no writer lock)         hparray rollback with HPARRAY_SQLITE_WRITER_LOCK=0: SQLite's busy handler
                           alone, as before the writer lock (hparray/store.py, WriterLock)

hparray's workers register first, as real ones do, so the claim and the finish also update
their worker row.

A "double claim" is a task handed out more than once (for Optuna: an enqueued trial handed to
more than one ask()). "Longest wait" is the longest single claim()/ask() call, the time one
worker sat waiting for work; "workers with work" counts workers that got at least one task.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sqlite3
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.common import console, load_line, machine, percentile, table, write_json
from hparray.store import Store
from hparray.store.queries import QUERIES
from hparray.tasks import TaskOutcome, TaskSpec

JOIN_TIMEOUT_S = 600.0
# Table sizes: the first row of each backend uses these; later rows are sized from the rate the
# backend just showed, so that every row runs about --target-s on a fast or a loaded machine.
FIRST_TASKS = {"hparray-wal": 300, "hparray-rollback": 100, "hparray-pg": 300, "raw-rollback": 100, "optuna": 30,
               "hparray-rollback-nolock": 100}
TASKS_PER_WORKER = {"optuna": 1}  # at least this many tasks per worker, so that every worker can get some
DEFAULT_PER_WORKER = 2
TASK_LIMITS = {"optuna": (20, 400)}
DEFAULT_LIMITS = (50, 5000)
# Run order within each process count: the rollback rows that the acceptance compares run next to each other.
ALL_BACKENDS = ("hparray-rollback", "raw-rollback", "hparray-rollback-nolock", "hparray-wal", "hparray-pg", "optuna")
LABELS = {
    "hparray-wal": "hparray sqlite wal",
    "hparray-rollback": "hparray sqlite rollback",
    "hparray-pg": "hparray postgresql",
    "raw-rollback": "raw sqlite3 rollback",
    "optuna": "optuna sqlite (RDBStorage)",
    "hparray-rollback-nolock": "(hparray rollback, no writer lock)",
}
# hparray's rows that the acceptance checks cover; the no-lock row shows what the writer lock buys.
OURS = ("hparray-wal", "hparray-rollback", "hparray-pg")
# The floor's finish: the one write a completion needs (hparray's also records result and attempt rows).
RAW_FINISH = ("UPDATE tasks SET status = 'done', lease = NULL, finished_at = :now "
              "WHERE id = :task_id AND lease = :lease AND status = 'running'")


@dataclass
class WorkerLog:
    """What one worker process saw: its claim latencies, the tasks it got, and when it stopped."""

    index: int
    latencies_s: list[float] = field(default_factory=list)
    tasks: list[int] = field(default_factory=list)
    lost_finishes: int = 0
    end: float = 0.0
    error: str = ""


@dataclass
class Row:
    key: str
    backend: str
    procs: int
    tasks: int
    done: int
    handed_out: int
    wall_s: float
    tasks_per_s: float
    p50_ms: float
    p99_ms: float
    longest_wait_s: float
    workers_with_work: int
    double_claims: int
    lost_finishes: int
    errors: list[str]
    runs: int = 1
    latencies_s: list[float] = field(default_factory=list, repr=False)


# ---------------------------------------------------------------- databases


def hparray_plan(n: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[TaskSpec]]:
    """One config and n videos: n independent no-op rows (no dependencies)."""
    configs = [{"hash": "bench", "kind": "finetune", "lr": 1e-5, "condition_frames": 5, "finetune_steps": 1,
                "params": "{}"}]
    videos: list[dict[str, Any]] = [{"name": f"v{i:05d}", "path": f"/bench/v{i:05d}.npy", "category": "bench",
                                     "caption": None, "seed": i} for i in range(n)]
    tasks = [TaskSpec(config_hash="bench", video=v["name"], kind="finetune", priority=1, estimate_s=1.0)
             for v in videos]
    return configs, videos, tasks


def make_hparray_db(url: str, n: int) -> None:
    store = Store.open(url)
    try:
        configs, videos, tasks = hparray_plan(n)
        store.apply_plan(configs, [], videos, tasks, max_attempts=3, now=time.time())
    finally:
        store.close()


def count_done(url: str) -> int:
    store = Store.open(url, create=False)
    try:
        return store.task_counts().done
    finally:
        store.close()


# ---------------------------------------------------------------- workers (run in forked children)


def hparray_worker(url: str, barrier: Any, log: WorkerLog) -> None:
    store = Store.open(url, create=False)
    worker_id = f"bench-{log.index}"
    store.register_worker(worker_id, "bench", os.getpid(), time.time())
    barrier.wait()
    outcome = TaskOutcome(status="done")
    while True:
        started = time.monotonic()
        task = store.claim(worker_id, time.time())
        log.latencies_s.append(time.monotonic() - started)
        if task is None:
            break
        log.tasks.append(task.id)
        if not store.finish(task, outcome, time.time()):
            log.lost_finishes += 1
    log.end = time.monotonic()
    store.close()


def raw_worker(path: str, barrier: Any, log: WorkerLog) -> None:
    conn = sqlite3.connect(path, timeout=60, isolation_level=None)
    conn.execute("PRAGMA busy_timeout = 60000")
    conn.execute("PRAGMA synchronous = NORMAL")
    claim = QUERIES["claim.sqlite"]
    worker_id = f"raw-{log.index}"
    barrier.wait()
    while True:
        lease = os.urandom(16).hex()
        started = time.monotonic()
        conn.execute("BEGIN IMMEDIATE")
        rows = conn.execute(claim, {"lease": lease, "worker_id": worker_id, "now": time.time()}).fetchall()
        conn.execute("COMMIT")
        log.latencies_s.append(time.monotonic() - started)
        if not rows:
            break
        log.tasks.append(rows[0][0])
        conn.execute("BEGIN IMMEDIATE")
        changed = conn.execute(RAW_FINISH, {"task_id": rows[0][0], "lease": lease, "now": time.time()}).rowcount
        conn.execute("COMMIT")
        log.lost_finishes += changed != 1
    log.end = time.monotonic()
    conn.close()


def optuna_worker(url: str, barrier: Any, log: WorkerLog, n: int) -> None:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name="bench", storage=optuna.storages.RDBStorage(url))
    barrier.wait()
    while True:
        started = time.monotonic()
        trial = study.ask()
        log.latencies_s.append(time.monotonic() - started)
        if trial.number >= n:  # not an enqueued trial: the queue is empty, so Optuna sampled a new one
            try:
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
            except (optuna.exceptions.UpdateFinishedTrialError, ValueError):
                pass
            break
        log.tasks.append(trial.number)  # enqueued in order: trial i carries params {"task": i}
        try:
            trial.suggest_int("task", 0, n - 1)  # what an objective would read: the enqueued value
            study.tell(trial, 0.0)
        # Another worker finished the same trial first: Optuna raises one or the other.
        except (optuna.exceptions.UpdateFinishedTrialError, ValueError):
            log.lost_finishes += 1
    log.end = time.monotonic()


def _child(target: Callable[..., None], args: tuple[Any, ...], env: dict[str, str], log: WorkerLog,
           barrier: Any, out: Path) -> None:
    os.environ.update(env)
    try:
        target(*args[:1], barrier, log, *args[1:])
    except BaseException:
        log.error = traceback.format_exc(limit=4)
        barrier.abort()  # do not leave the others waiting for a worker that will never arrive
    out.write_text(json.dumps(asdict(log)))


def run_processes(target: Callable[..., None], args: tuple[Any, ...], procs: int, env: dict[str, str],
                  tmp: Path) -> tuple[float, list[WorkerLog]]:
    """Fork `procs` workers, release them together, return (seconds to the last one's end, logs)."""
    ctx = mp.get_context("fork")
    barrier = ctx.Barrier(procs + 1)
    outs = [tmp / f"worker-{i}.json" for i in range(procs)]
    children = [ctx.Process(target=_child, args=(target, args, env, WorkerLog(i), barrier, outs[i]))
                for i in range(procs)]
    for child in children:
        child.start()
    try:
        barrier.wait(timeout=120)
    except Exception:
        pass  # a worker failed to start: its log says why
    started = time.monotonic()
    deadline = started + JOIN_TIMEOUT_S
    for child in children:
        child.join(timeout=max(1.0, deadline - time.monotonic()))
        if child.is_alive():
            child.kill()
            child.join()
    logs = []
    for i, out in enumerate(outs):
        if out.exists():
            logs.append(WorkerLog(**json.loads(out.read_text())))
        else:
            logs.append(WorkerLog(i, error=f"worker {i} exited with {children[i].exitcode} and no log"))
    end = max((log.end for log in logs if log.end), default=time.monotonic())
    return end - started, logs


def summarize(backend: str, procs: int, n: int, done: int, wall_s: float, logs: list[WorkerLog]) -> Row:
    latencies = [x for log in logs for x in log.latencies_s]
    counts = Counter(task for log in logs for task in log.tasks)
    handed_out = sum(len(log.tasks) for log in logs)
    return Row(
        key=backend, backend=LABELS[backend], procs=procs, tasks=n, done=done, handed_out=handed_out,
        wall_s=round(wall_s, 3),
        tasks_per_s=round(handed_out / wall_s, 1) if wall_s > 0 else 0.0,
        p50_ms=round(percentile(latencies, 50) * 1e3, 2), p99_ms=round(percentile(latencies, 99) * 1e3, 2),
        longest_wait_s=round(max(latencies, default=0.0), 3),
        workers_with_work=sum(1 for log in logs if log.tasks),
        double_claims=sum(1 for c in counts.values() if c > 1),
        lost_finishes=sum(log.lost_finishes for log in logs),
        errors=[log.error.strip().splitlines()[-1] for log in logs if log.error][:3],
        latencies_s=latencies,
    )


def merge(runs: list[Row]) -> Row:
    """One row from repeated runs of a configuration: rates over the summed time, latency
    percentiles over every claim, the worst longest wait and the fewest workers with work."""
    if len(runs) == 1:
        return runs[0]
    latencies = [x for r in runs for x in r.latencies_s]
    wall = sum(r.wall_s for r in runs)
    handed_out = sum(r.handed_out for r in runs)
    first = runs[0]
    return Row(
        key=first.key, backend=first.backend, procs=first.procs, tasks=sum(r.tasks for r in runs),
        done=sum(r.done for r in runs), handed_out=handed_out, wall_s=round(wall, 3),
        tasks_per_s=round(handed_out / wall, 1) if wall else 0.0,
        p50_ms=round(percentile(latencies, 50) * 1e3, 2), p99_ms=round(percentile(latencies, 99) * 1e3, 2),
        longest_wait_s=max(r.longest_wait_s for r in runs),
        workers_with_work=min(r.workers_with_work for r in runs),
        double_claims=sum(r.double_claims for r in runs), lost_finishes=sum(r.lost_finishes for r in runs),
        errors=[e for r in runs for e in r.errors][:3], runs=len(runs), latencies_s=latencies,
    )


# ---------------------------------------------------------------- one configuration


@contextmanager
def patched_env(values: dict[str, str]) -> Iterator[None]:
    """os.environ with `values` set, restored afterwards."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def table_size(backend: str, procs: int, fixed: int | None, previous: Row | None, target_s: float) -> int:
    """Rows to put in the table: fixed if asked, else enough for ~target_s at the last rate seen
    and at least a few per worker."""
    if fixed:
        return fixed
    least = TASKS_PER_WORKER.get(backend, DEFAULT_PER_WORKER) * procs
    if previous is None or previous.tasks_per_s <= 0:
        return max(FIRST_TASKS[backend], least)
    low, high = TASK_LIMITS.get(backend, DEFAULT_LIMITS)
    return int(min(high, max(low, least, previous.tasks_per_s * target_s)))


def measure(backend: str, procs: int, n: int, pg: Any, tmp: Path) -> Row:
    work = Path(tempfile.mkdtemp(prefix=f"{backend}-{procs}-", dir=tmp))
    env: dict[str, str] = {}
    if backend in ("hparray-wal", "hparray-rollback", "raw-rollback", "hparray-rollback-nolock"):
        # Every Store.open sets the journal mode, so the parent opens with the workers' setting too.
        env["HPARRAY_SQLITE_JOURNAL"] = "wal" if backend == "hparray-wal" else "delete"
        if backend == "hparray-rollback-nolock":
            env["HPARRAY_SQLITE_WRITER_LOCK"] = "0"
        url = f"sqlite:///{work / 'bench.db'}"
        with patched_env(env):
            make_hparray_db(url, n)
            if backend == "raw-rollback":
                wall, logs = run_processes(raw_worker, (str(work / "bench.db"),), procs, env, work)
                with closing(sqlite3.connect(work / "bench.db")) as conn:
                    done = conn.execute("SELECT COUNT(*) FROM tasks WHERE status = 'done'").fetchone()[0]
            else:
                wall, logs = run_processes(hparray_worker, (url,), procs, env, work)
                done = count_done(url)
        return summarize(backend, procs, n, done, wall, logs)
    if backend == "hparray-pg":
        url = pg.database()
        try:
            make_hparray_db(url, n)
            wall, logs = run_processes(hparray_worker, (url,), procs, env, work)
            done = count_done(url)
        finally:
            pg.drop(url)
        return summarize(backend, procs, n, done, wall, logs)
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = f"sqlite:///{work / 'optuna.db'}"
    study = optuna.create_study(study_name="bench", storage=optuna.storages.RDBStorage(url))
    for i in range(n):
        study.enqueue_trial({"task": i})
    wall, logs = run_processes(optuna_worker, (url, n), procs, env, work)
    done = sum(1 for t in study.get_trials(deepcopy=False)
               if t.state == optuna.trial.TrialState.COMPLETE and t.number < n)
    return summarize(backend, procs, n, done, wall, logs)


def _public(row: Row) -> dict[str, Any]:
    """A row for the JSON file, without its raw latencies."""
    data = asdict(row)
    data.pop("latencies_s")
    return data


def start_postgres() -> tuple[Any, str]:
    """The tests' throw-away server (tests/pg.py); (None, why) where there is none."""
    try:
        from tests.pg import PostgresServer, PostgresUnavailable
    except ImportError as err:
        return None, f"tests/pg.py not importable: {err}"
    try:
        return PostgresServer.start(), ""
    except PostgresUnavailable as why:
        return None, str(why)


# ---------------------------------------------------------------- acceptance


def acceptance(rows: list[Row]) -> list[dict[str, Any]]:
    """The checks docs/benchmarks.md reports, from the rows of this one run."""
    def get(backend: str, procs: int) -> Row | None:
        return next((r for r in rows if r.key == backend and r.procs == procs), None)

    checks: list[dict[str, Any]] = []
    rollback, raw, opt = get("hparray-rollback", 32), get("raw-rollback", 32), get("optuna", 32)
    if rollback and raw:
        ratio = rollback.tasks_per_s / raw.tasks_per_s if raw.tasks_per_s else 0.0
        checks.append({"check": "32 procs: hparray rollback >= 0.5x raw sqlite3 rollback",
                       "value": f"{ratio:.2f}x ({rollback.tasks_per_s} vs {raw.tasks_per_s} tasks/s)",
                       "pass": ratio >= 0.5})
    if rollback and opt:
        ratio = rollback.tasks_per_s / opt.tasks_per_s if opt.tasks_per_s else float("inf")
        checks.append({"check": "32 procs: hparray rollback >= 5x Optuna",
                       "value": f"{ratio:.1f}x ({rollback.tasks_per_s} vs {opt.tasks_per_s} tasks/s)",
                       "pass": ratio >= 5})
    ours = [r for r in rows if r.key in OURS]
    if ours:
        doubles = sum(r.double_claims + r.lost_finishes + abs(r.tasks - r.done) for r in ours)
        checks.append({"check": "hparray rows: 0 double claims, every task done exactly once",
                       "value": f"{doubles} double/lost/missing over {len(ours)} rows", "pass": doubles == 0})
    starved = [r for r in ours if r.procs in (32, 64)]
    if starved:
        worst = min(starved, key=lambda r: r.workers_with_work / r.procs)
        checks.append({"check": "hparray rows: every worker gets work at 32 and 64 procs",
                       "value": f"worst {worst.workers_with_work}/{worst.procs} ({worst.backend})",
                       "pass": all(r.workers_with_work == r.procs for r in starved)})
    at64 = [r for r in ours if r.procs == 64]
    if at64:
        worst = max(at64, key=lambda r: r.longest_wait_s)
        checks.append({"check": "hparray rows: longest claim wait at 64 procs < 2 s",
                       "value": f"{worst.longest_wait_s:.3f} s ({worst.backend})",
                       "pass": worst.longest_wait_s < 2.0})
    return checks


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--procs", default="1,8,32,64", help="comma-separated worker process counts")
    parser.add_argument("--target-s", type=float, default=2.5, help="seconds each run should take (sizes the table)")
    parser.add_argument("--repeat", type=int, default=2,
                        help="runs per row, in forward then reverse backend order (ABBA), merged into one row")
    parser.add_argument("--tasks", type=int, default=0, help="fixed no-op tasks per hparray/raw row (0: by --target-s)")
    parser.add_argument("--optuna-tasks", type=int, default=0,
                        help="fixed enqueued trials per Optuna row (0: by --target-s)")
    parser.add_argument("--backends", default=",".join(ALL_BACKENDS), help=f"subset of {','.join(ALL_BACKENDS)}")
    parser.add_argument("--out", default="claims", help="bench/out/<name>.json")
    args = parser.parse_args(argv)
    procs_list = [int(p) for p in args.procs.split(",")]
    backends = [b for b in args.backends.split(",") if b]
    unknown = set(backends) - set(ALL_BACKENDS)
    if unknown:
        parser.error(f"unknown backends {sorted(unknown)}: choose from {', '.join(ALL_BACKENDS)}")

    info = machine()
    pg, pg_why = start_postgres() if "hparray-pg" in backends else (None, "")
    if pg is None and "hparray-pg" in backends:
        console.print(f"[yellow]PostgreSQL skipped: {pg_why}[/]")
        backends.remove("hparray-pg")
    rows: list[Row] = []
    runs: list[Row] = []
    try:
        with tempfile.TemporaryDirectory(prefix="hparray-bench-") as tmp:
            # Backends interleaved within each process count, and repeated in reverse order, so
            # that drifting load (other users, the disk's fsync latency) hits every row alike.
            for procs in procs_list:
                order = [b for i in range(args.repeat) for b in (backends if i % 2 == 0 else backends[::-1])]
                these: dict[str, list[Row]] = {}
                for backend in order:
                    fixed = args.optuna_tasks if backend == "optuna" else args.tasks
                    previous = next((r for r in reversed(runs) if r.key == backend), None)
                    n = table_size(backend, procs, fixed, previous, args.target_s)
                    run = measure(backend, procs, n, pg, Path(tmp))
                    runs.append(run)
                    these.setdefault(backend, []).append(run)
                    console.print(f"  {run.backend:36s} {procs:3d} procs: {run.tasks_per_s:8.1f} tasks/s, "
                                  f"longest wait {run.longest_wait_s:.3f} s, {run.workers_with_work}/{procs} "
                                  f"with work{'  ERRORS: ' + '; '.join(run.errors) if run.errors else ''}")
                rows.extend(merge(these[b]) for b in backends)
    finally:
        if pg is not None:
            pg.stop()

    checks = acceptance(rows)
    console.print(table(
        "Claim throughput: no-op tasks, claim -> finish, N processes started together",
        ["backend", "procs", "tasks", "tasks/s", "p50 claim ms", "p99 claim ms", "longest wait s",
         "workers with work", "double claims", "refused finishes"],
        [[r.backend, r.procs, r.tasks, f"{r.tasks_per_s:,.1f}", f"{r.p50_ms:.2f}", f"{r.p99_ms:.2f}",
          f"{r.longest_wait_s:.3f}", f"{r.workers_with_work}/{r.procs}", r.double_claims, r.lost_finishes]
         for r in rows],
        caption=load_line(info)))
    console.print(table("Acceptance (this run)", ["check", "value", "result"],
                        [[c["check"], c["value"], "PASS" if c["pass"] else "FAIL"] for c in checks]))
    path = write_json(args.out, info, [_public(r) for r in rows], acceptance=checks,
                      runs=[_public(r) for r in runs],
                      settings={"target_s": args.target_s, "repeat": args.repeat, "tasks": args.tasks,
                                "optuna_tasks": args.optuna_tasks, "procs": procs_list})
    console.print(f"wrote {path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path}")


if __name__ == "__main__":
    main()
