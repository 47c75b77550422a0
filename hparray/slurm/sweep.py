"""Slurm: render the worker-array script, submit it, ask squeue what is alive, cancel.

The array is a pool of workers, not a list of tasks: every array task runs `hparray worker`,
which claims rows until none is left. So the array size is only how many workers to run (never
more than the rows that can be claimed), any task can run any row, and a task that dies loses
only the row it held, which the Slurm-aware reaper here puts back as soon as squeue stops
listing the task as running, instead of after the heartbeat grace.

Every Slurm command goes through `_command`; everything else here is parsing and deciding,
testable without Slurm.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from sqlalchemy.engine import make_url

from hparray.config import Settings, slurm_seconds
from hparray.errors import SlurmError
from hparray.rounding import largest_remainder
from hparray.slurm.client import (
    DEFAULT_MAX_ARRAY_SIZE,
    SlurmTask,
    SlurmUnavailable,
    last_line,
    max_array_size,
    parse_sbatch,
    partition_nodes,
    query_jobs,
    run_command,
)
from hparray.slurm.script import Overrides, SlurmOptionError, log_dir_of, render_script
from hparray.store import ReapReport, Store

log = logging.getLogger(__name__)

# A worker that registered this long before its task's current start belongs to an earlier run of
# a requeued task. Requeued tasks restart minutes later; the margin absorbs clock skew.
RESTART_MARGIN_S = 60.0
# squeue's man page asks not to poll it in loops: `status --watch` asks at most this often.
SQUEUE_MIN_INTERVAL_S = 10.0


def split_arrays(workers: int, throttle: int, max_array_size: int) -> list[tuple[int, int]]:
    """(size, throttle) of each array for `workers` array tasks, at most `throttle` running.

    MaxArraySize caps the index, not the count: indices run 0..MaxArraySize-1, so one array holds
    at most MaxArraySize tasks and more are split into several arrays. The throttle is shared
    among them in proportion to size (each array runs at least one task at a time).
    """
    if max_array_size < 1:
        raise SlurmError("MaxArraySize is 0 on this cluster, so job arrays are disabled: "
                         "run `hparray submit --local` inside an allocation, or ask the admins")
    if workers < 1:
        return []
    sizes = [max_array_size] * (workers // max_array_size)
    if workers % max_array_size:
        sizes.append(workers % max_array_size)
    total = min(max(1, throttle), workers)
    throttles = largest_remainder(sizes, total, low=[1] * len(sizes), high=sizes)
    return list(zip(sizes, throttles))


# ---------------------------------------------------------------- what Slurm says about our workers


def worker_key(array_job_id: str | None, array_task_id: str | None, job_id: str | None) -> str | None:
    """The squeue %i of the task a worker ran in."""
    if array_job_id and array_task_id is not None:
        return f"{array_job_id}_{array_task_id}"
    return job_id or None


@dataclass
class SlurmView:
    """One pass of squeue over this sweep's submissions: which workers are gone, which tasks alive."""

    available: bool
    problem: str = ""
    submissions: list[Any] = field(default_factory=list)
    tasks: dict[str, SlurmTask] = field(default_factory=dict)
    gone_workers: list[str] = field(default_factory=list)

    def task_of(self, row: Any) -> SlurmTask | None:
        key = worker_key(row.slurm_array_job_id, row.slurm_array_task_id, row.slurm_job_id)
        return self.tasks.get(key) if key else None

    def jobs(self) -> list[dict[str, Any]]:
        """One entry per submission for `status`: what squeue says about its tasks."""
        entries = []
        for sub in self.submissions:
            states = Counter(task.state for task in self.tasks.values() if task.array_job_id == sub.job_id)
            reasons = sorted({task.reason for task in self.tasks.values()
                              if task.array_job_id == sub.job_id and task.queued and task.reason != "None"})
            if not self.available:
                summary = f"unknown ({self.problem})"
            elif not states:
                summary = "cancelled" if sub.state == "cancelled" else "finished (no longer in squeue)"
            else:
                summary = ", ".join(f"{n} {state.lower()}" for state, n in sorted(states.items()))
                if reasons:
                    summary += f" ({', '.join(reasons)})"
            entries.append({"job_id": sub.job_id, "array_size": sub.array_size, "throttle": sub.throttle,
                            "submitted_at": sub.submitted_at, "state": sub.state, "tasks": dict(states),
                            "summary": summary})
        return entries

    def active_jobs(self) -> list[str]:
        """Submissions with tasks still queued or running."""
        return sorted({task.array_job_id for task in self.tasks.values() if task.alive or task.queued}, key=int)


def observe(store: Store) -> SlurmView:
    """Ask squeue once about this sweep's submitted jobs and decide which workers are gone.

    Only workers of jobs that `hparray submit` recorded are judged (a worker sbatch'ed by hand is
    left to the heartbeat grace), so one sweep database is driven from one cluster. A worker is
    gone when its task is not in squeue, is in a state without processes (ended, or requeued and
    pending), or has started again since the worker registered (a requeued task's earlier run).
    """
    submissions = store.submissions()
    if not submissions:
        return SlurmView(available=False, problem="nothing submitted to Slurm")
    submitted = {sub.job_id for sub in submissions}
    try:
        tasks = query_jobs(sub.job_id for sub in submissions)
    except SlurmUnavailable as err:
        log.warning("%s; using the heartbeat grace alone", err)
        return SlurmView(available=False, problem=str(err), submissions=submissions)
    view = SlurmView(available=True, submissions=submissions, tasks=tasks)
    for worker in store.slurm_workers():
        if (worker.slurm_array_job_id or worker.slurm_job_id) not in submitted:
            continue
        task = view.task_of(worker)
        restarted = (task is not None and task.started_at is not None
                     and worker.started_at < task.started_at - RESTART_MARGIN_S)
        if task is None or not task.alive or restarted:
            view.gone_workers.append(worker.id)
    return view


def hung_rows(store: Store, view: SlurmView, now: float, hung_after_s: float) -> list[dict[str, Any]]:
    """Running rows whose heartbeat is late while Slurm says their task runs: stuck, not dead.

    They are reported, not reaped: the heartbeat grace decides that, as without Slurm.
    """
    hung = []
    for row in store.running_tasks():
        task = view.task_of(row)
        if task is None or not task.alive or row.heartbeat_at is None:
            continue
        age = now - row.heartbeat_at
        if age > hung_after_s:
            hung.append({"task_id": row.id, "worker_id": row.worker_id, "slurm_task": task.key,
                         "slurm_state": task.state, "heartbeat_age_s": age})
    return hung


@dataclass
class SlurmReap:
    """What one Slurm-aware reap did."""

    report: ReapReport
    gone_workers: list[str]
    view: SlurmView


def reap(store: Store, now: float, grace_s: float) -> SlurmReap:
    """Put back the rows of workers Slurm no longer runs (at once), and stale rows (after the grace)."""
    view = observe(store)
    return SlurmReap(report=store.reap(now, grace_s, gone_workers=view.gone_workers),
                     gone_workers=view.gone_workers, view=view)


# ---------------------------------------------------------------- submit


@dataclass(frozen=True)
class Backend:
    """Where `hparray submit` runs the workers, and the sentence that says so."""

    slurm: bool
    message: str


def choose_backend(*, local: bool, dry_run: bool, overrides: Overrides, throttle: int | None) -> Backend:
    """Slurm when sbatch is here and --local is not given; a dry run previews Slurm anywhere."""
    given = [flag for flag, value in (("--partition", overrides.partition), ("--time", overrides.time),
                                      ("--gpus", overrides.gpus), ("--throttle", throttle),
                                      ("--sbatch-arg", overrides.sbatch_args or None)) if value is not None]
    one = len(given) == 1
    if local:
        if given:
            raise SlurmOptionError(f"{', '.join(given)} only {'applies' if one else 'apply'} to Slurm: "
                                   "drop --local to submit a job array")
        return Backend(False, "running workers on this machine (--local)")
    if shutil.which("sbatch"):
        return Backend(True, "submitting a Slurm job array (sbatch found; --local runs workers here instead)")
    if dry_run:
        return Backend(True, "sbatch is not on PATH here: showing what `hparray submit` would submit on a "
                             "Slurm login node")
    if given:
        raise SlurmOptionError(f"{', '.join(given)} {'needs' if one else 'need'} Slurm, but sbatch is not on "
                               f"PATH: run on a Slurm login node, or drop {'it' if one else 'them'} to run "
                               "workers here")
    return Backend(False, "sbatch is not on PATH: running workers on this machine (as with --local)")


def claimable_rows(store: Store) -> int:
    """Rows a worker could still claim: pending and not blocked by a failed dependency."""
    return store.task_counts().runnable


@dataclass(frozen=True)
class ArraySpec:
    """One job array to submit: its script, where it is written, and the sbatch command."""

    size: int
    throttle: int
    script: str
    script_path: Path
    command: list[str]
    job_id: str | None = None


@dataclass
class Submission:
    """What `submit` did (or, in a dry run, would do)."""

    claimable: int
    running: int
    arrays: list[ArraySpec]
    max_array_size: int
    log_dir: Path
    gpus: int
    signal_grace_s: int
    active_jobs: list[str]
    reaped: int
    dry_run: bool
    active_workers: int = 0  # array tasks of this sweep already queued or running: workers to come
    wanted: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def job_ids(self) -> list[str]:
        return [array.job_id for array in self.arrays if array.job_id]


def hide_db_password(worker_command: list[str]) -> tuple[list[str], dict[str, str]]:
    """A database URL with a password stays out of the script (printed, stored, kept by Slurm):
    it travels in sbatch's environment as HPARRAY_DB, which `--export=ALL` (the default) passes on."""
    if "--db" not in worker_command:
        return worker_command, {}
    at = worker_command.index("--db")
    url = worker_command[at + 1]
    try:
        password = make_url(url).password if "://" in url else None
    except Exception:  # not a URL sqlalchemy can parse: nothing we could hide either
        password = None
    if not password:
        return worker_command, {}
    return worker_command[:at] + worker_command[at + 2:], {"HPARRAY_DB": url}


def submit(settings: Settings, store: Store, *, worker_command: list[str], workers: int | None,
           throttle: int | None, overrides: Overrides, dry_run: bool, now: float | None = None) -> Submission:
    """Submit arrays of `min(claimable rows, workers)` workers, or say why not (a dry run writes nothing).

    Rows of workers Slurm no longer runs are put back first, so they count; submitting again
    after an interruption therefore asks only for the work that is left.
    """
    now = time.time() if now is None else now
    view = observe(store)
    reaped = 0
    if view.gone_workers and not dry_run:
        report = store.reap(now, settings.tasks.heartbeat_grace_s, gone_workers=view.gone_workers)
        reaped = len(report.released)
    claimable = claimable_rows(store)
    if dry_run and view.gone_workers:  # what the reap above would have put back
        gone = set(view.gone_workers)
        claimable += sum(1 for row in store.running_tasks() if row.worker_id in gone)
    running = store.task_counts().running
    wanted = settings.slurm.workers if workers is None else workers
    # Workers of this sweep that are queued or running will claim rows too: count them first, so a
    # second submit while the first array runs asks only for the workers still missing.
    active = sum(1 for task in view.tasks.values() if task.alive or task.queued)
    count = max(0, min(claimable, wanted) - active)
    limit = settings.slurm.throttle if throttle is None else throttle
    notes = [check_time_limit(settings, store, overrides.time)]
    check_partition_fits(settings, overrides)
    log_dir = log_dir_of(settings)
    workdir = settings.config_dir.parent
    gpus = settings.slurm.gpus_per_task if overrides.gpus is None else overrides.gpus
    submission = Submission(claimable=claimable, running=running, arrays=[], max_array_size=DEFAULT_MAX_ARRAY_SIZE,
                            log_dir=log_dir, gpus=gpus, signal_grace_s=settings.slurm.signal_grace_s,
                            active_jobs=view.active_jobs(), reaped=reaped, dry_run=dry_run, active_workers=active,
                            wanted=wanted, notes=[note for note in notes if note])
    if count == 0:
        return submission
    command, secret_env = hide_db_password(worker_command)
    submission.max_array_size = max_array_size() if shutil.which("scontrol") else DEFAULT_MAX_ARRAY_SIZE
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
    chunks = split_arrays(count, limit, submission.max_array_size)
    for i, (size, chunk_throttle) in enumerate(chunks):
        script = render_script(settings.slurm, array_size=size, throttle=chunk_throttle, worker_command=command,
                               workdir=workdir, overrides=overrides)
        suffix = f"-{i + 1}" if len(chunks) > 1 else ""
        path = log_dir / f"{settings.slurm.job_name}-{stamp}{suffix}.sbatch"
        submission.arrays.append(ArraySpec(size=size, throttle=chunk_throttle, script=script, script_path=path,
                                           command=["sbatch", "--parsable", str(path)]))
    if dry_run:
        return submission
    log_dir.mkdir(parents=True, exist_ok=True)  # Slurm does not create the folder of --output
    env = {**os.environ, **secret_env}
    for i, array in enumerate(submission.arrays):
        array.script_path.write_text(array.script)
        result = run_command(array.command, env=env)
        if result.returncode != 0:
            done = f" (already submitted: {', '.join(submission.job_ids)})" if submission.job_ids else ""
            why = last_line(result.stderr or result.stdout)
            fix = ("Slurm does not answer here: check `scontrol ping`, or run workers on this machine with --local"
                   if re.search(r"configuration source|contact slurm controller", why, re.I) else
                   "check the partition, account, time and GPU request (`hparray submit --dry-run` shows them)")
            raise SlurmError(f"sbatch failed: {why}{done}: {fix}")
        job_id = parse_sbatch(result.stdout)
        submission.arrays[i] = replace(array, job_id=job_id)
        store.record_submission(job_id, array.size, array.throttle, shlex.join(array.command), array.script, now)
    return submission


# ---------------------------------------------------------------- will an array task fit?


def expected_row_s(settings: Settings, store: Store | None) -> tuple[float, str]:
    """How long one fine-tune row is expected to take, and where the figure comes from: the 90th
    percentile of this sweep's finished fine-tune rows once there are three, else the config."""
    measured = [] if store is None else sorted(store.durations("finetune"))
    if len(measured) >= 3:
        p90 = measured[min(len(measured) - 1, int(0.9 * len(measured)))]
        return p90, f"the 90th percentile of {len(measured)} finished rows"
    return settings.tasks.gpu_minutes_per_task * 60.0, "tasks.gpu_minutes_per_task"


def check_time_limit(settings: Settings, store: Store | None, time_override: str | None) -> str:
    """Refuse a time limit shorter than one row (every array task would give its row back and exit);
    return a warning when a task can finish only one row, else ''."""
    given = time_override or settings.slurm.time
    where = f"--time {given}" if time_override else f"slurm.time {given}"
    try:
        limit_s = slurm_seconds(given)
    except ValueError:
        raise SlurmOptionError(f"{where} is not a Slurm time: write MM, HH:MM:SS or D-HH:MM:SS") from None
    row_s, source = expected_row_s(settings, store)
    if row_s >= limit_s:
        raise SlurmOptionError(
            f"{where} is no longer than one fine-tune row ({row_s / 60:.1f} min expected, from {source}): every "
            "array task would give its row back and exit without finishing one; raise the time limit, or lower "
            "tasks.gpu_minutes_per_task if rows are faster than that")
    if 2 * row_s > limit_s:
        return (f"note: {where} fits one fine-tune row ({row_s / 60:.1f} min expected) but not two: each array "
                "task runs a single row, and the model loads once per row")
    return ""



def check_partition_fits(settings: Settings, overrides: Overrides) -> str:
    """Refuse an array task that no node of the partition can run (it would pend forever, reason
    PartitionConfig or Resources); returns what was checked, or '' when Slurm cannot tell."""
    partition = overrides.partition or settings.slurm.partition
    gpus = settings.slurm.gpus_per_task if overrides.gpus is None else overrides.gpus
    cpus, mem_mb = settings.slurm.cpus_per_task, settings.slurm.mem_gb * 1024
    nodes = partition_nodes(partition)
    if not nodes:
        return ""
    if any(n.cpus >= cpus and n.mem_mb >= mem_mb and n.gpus >= gpus for n in nodes):
        return f"{len(nodes)} nodes in partition {partition or 'default'}"
    too_big = [knob for knob, asked, best in (
        (f"slurm.cpus_per_task ({cpus} CPUs)", cpus, max(n.cpus for n in nodes)),
        (f"slurm.mem_gb ({settings.slurm.mem_gb} GB)", mem_mb, max(n.mem_mb for n in nodes)),
        (f"--gpus/slurm.gpus_per_task ({gpus} GPUs)", gpus, max(n.gpus for n in nodes))) if asked > best]
    offer = (f"{max(n.cpus for n in nodes)} CPUs, {max(n.mem_mb for n in nodes) / 1024:.0f} GB, "
             f"{max(n.gpus for n in nodes)} GPUs at most")
    raise SlurmOptionError(
        f"no node of partition {partition or '(default)'} can run one array task: its nodes offer {offer}; "
        f"lower {' and '.join(too_big) or 'the request (no single node has it all)'}, or choose another partition")


# ---------------------------------------------------------------- cancel


@dataclass
class Cancellation:
    """What `hparray cancel` did."""

    job_ids: list[str]
    released: list[int]
    failed: list[int]
    still_running: list[str]


def cancel(store: Store, grace_s: float, *, wait_s: float = 60.0) -> Cancellation:
    """scancel this sweep's jobs that squeue still lists, wait for their workers to put their rows
    back, then release what the killed ones held; the submissions are marked cancelled."""
    submissions = [sub for sub in store.submissions() if sub.state == "submitted"]
    tasks = query_jobs(sub.job_id for sub in submissions)
    live = sorted({task.array_job_id for task in tasks.values() if task.alive or task.queued}, key=int)
    if not live:
        return Cancellation(job_ids=[], released=[], failed=[], still_running=[])
    result = run_command(["scancel", *live])
    if result.returncode != 0:
        raise SlurmError(f"scancel failed: {last_line(result.stderr or result.stdout)}: "
                         f"cancel by hand with `scancel {' '.join(live)}`")
    deadline, pause = time.monotonic() + wait_s, 0.5
    while True:
        still = sorted({task.key for task in query_jobs(live).values() if task.alive})
        if not still or time.monotonic() >= deadline:
            break
        time.sleep(pause)
        pause = min(pause * 1.5, 5.0)  # squeue is not for tight loops
    # Workers still running past the wait keep their rows: Slurm kills them after its KillWait,
    # and the next `status` or `reap` finds them gone.
    gone = [worker.id for worker in store.slurm_workers()
            if (worker.slurm_array_job_id or worker.slurm_job_id) in live
            and worker_key(worker.slurm_array_job_id, worker.slurm_array_task_id, worker.slurm_job_id) not in still]
    report = store.reap(time.time(), grace_s, gone_workers=gone)
    for job_id in live:
        store.cancel_submission(job_id)
    return Cancellation(job_ids=live, released=report.released, failed=report.failed, still_running=still)

