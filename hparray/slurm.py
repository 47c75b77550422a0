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
import subprocess
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
from sqlalchemy.engine import make_url

from hparray.config import Settings, SlurmSettings
from hparray.errors import BadInput, SlurmError
from hparray.status import SweepStatus, sweep_status, try_reap
from hparray.store import ReapReport, Store

log = logging.getLogger(__name__)

TEMPLATE = "worker.sbatch.j2"
# Slurm's default; read from `scontrol show config` where Slurm answers.
DEFAULT_MAX_ARRAY_SIZE = 1001
SQUEUE_FORMAT = "%i|%A|%F|%K|%T|%r|%S"
# States in which the task's processes exist. A requeued task is PENDING: its old worker is gone.
ALIVE_STATES = frozenset({"RUNNING", "COMPLETING", "CONFIGURING", "SUSPENDED", "STOPPED", "SIGNALING",
                          "STAGE_OUT", "RESIZING"})
QUEUED_STATES = frozenset({"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD"})
# A worker that registered this long before its task's current start belongs to an earlier run of
# a requeued task. Requeued tasks restart minutes later; the margin absorbs clock skew.
RESTART_MARGIN_S = 60.0
# squeue's man page asks not to poll it in loops: `status --watch` asks at most this often.
SQUEUE_MIN_INTERVAL_S = 10.0
COMMAND_TIMEOUT_S = 120.0
# Slurm's time syntax: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS, or no limit.
TIME_PATTERN = re.compile(r"(?:(\d+)-)?(\d+)(?::(\d{2}))?(?::(\d{2}))?|UNLIMITED|INFINITE")


def slurm_seconds(value: str) -> float:
    """A Slurm time limit in seconds (inf for UNLIMITED); ValueError when it is not one."""
    match = TIME_PATTERN.fullmatch(value.strip())
    if match is None:
        raise ValueError(f"{value!r} is not a Slurm time")
    if match.group(2) is None:
        return float("inf")
    days, first, second, third = match.groups()
    a, b, c = int(first), int(second or 0), int(third or 0)
    if days is not None:  # D-HH[:MM[:SS]]
        return int(days) * 86400 + a * 3600 + b * 60 + c
    if third is not None:  # HH:MM:SS
        return a * 3600 + b * 60 + c
    return a * 60 + b  # MM[:SS]


class SlurmOptionError(BadInput):
    """A Slurm option given on the command line or in base.yaml cannot be used."""


class SlurmUnavailable(SlurmError):
    """A Slurm command is missing or Slurm does not answer."""


# ---------------------------------------------------------------- rendering


@dataclass(frozen=True)
class Overrides:
    """Command-line changes to base.yaml's `slurm:` section, for one submission."""

    partition: str | None = None
    time: str | None = None
    gpus: int | None = None
    sbatch_args: tuple[str, ...] = ()


def normalise_directive(arg: str, where: str) -> str:
    """`--mail-type=END`, `mail-type=END` or `#SBATCH --mail-type=END` -> `--mail-type=END`."""
    text = arg.strip()
    if text.startswith("#SBATCH"):
        text = text[len("#SBATCH"):].strip()
    if not text or "\n" in text:
        raise SlurmOptionError(f"{where} {arg!r} is not one sbatch option: write it like --mail-type=END")
    if not text.startswith("-"):
        text = "--" + text
    name = text.split("=", 1)[0].split()[0]
    if name in ("--array", "-a"):
        raise SlurmOptionError(f"{where} {arg!r}: hparray sets --array itself: use --workers and --throttle")
    return text


def _path_value(path: Path, where: str, pattern: bool = False) -> str:
    """A path inside a double-quoted #SBATCH value: sbatch reads `\"` as a quote inside it; a
    backslash escapes anything, so a path holding one cannot be written; in --output/--error a `%`
    starts a filename pattern, so it is doubled."""
    text = str(path)
    if "\\" in text or "\n" in text:
        raise SlurmOptionError(f"{where} {text!r} holds a backslash or a newline, which sbatch cannot read in a "
                               "directive: move the project to a path without them")
    text = text.replace('"', '\\"')
    return text.replace("%", "%%") if pattern else text


def _plain(value: str | None, where: str) -> str | None:
    """A directive value: sbatch reads `#SBATCH` lines word by word, so no whitespace."""
    if value is not None and (not value.strip() or re.search(r"\s", value)):
        raise SlurmOptionError(f"{where} {value!r} contains whitespace: sbatch directives cannot hold it; "
                               "choose a value without spaces")
    return value


def render_script(settings: SlurmSettings, *, array_size: int, throttle: int, worker_command: list[str],
                  workdir: Path, overrides: Overrides = Overrides()) -> str:
    """The batch script of one worker array: sbatch/worker.sbatch.j2 filled in (pure: no I/O but the template).

    A relative `slurm.log_dir` is relative to `workdir`, the folder the workers run in.
    """
    if array_size < 1 or throttle < 1:
        raise SlurmOptionError(f"array of {array_size} workers, {throttle} at once: both must be at least 1")
    time_limit = overrides.time or settings.time
    if not TIME_PATTERN.fullmatch(time_limit):
        raise SlurmOptionError(f"--time {time_limit!r} is not a Slurm time: write MM, HH:MM:SS or D-HH:MM:SS")
    gpus = settings.gpus_per_task if overrides.gpus is None else overrides.gpus
    if gpus < 0:
        raise SlurmOptionError(f"--gpus {gpus}: use 0 (no GPU) or more")
    log_dir = Path(settings.log_dir)
    log_dir = log_dir if log_dir.is_absolute() else Path(workdir) / log_dir
    extra = [normalise_directive(arg, "slurm.extra_directives") for arg in settings.extra_directives]
    extra += [normalise_directive(arg, "--sbatch-arg") for arg in overrides.sbatch_args]
    context = {
        "job_name": _plain(settings.job_name, "slurm.job_name"),
        "partition": _plain(overrides.partition or settings.partition, "--partition"),
        "account": _plain(settings.account, "slurm.account"),
        "qos": _plain(settings.qos, "slurm.qos"),
        "time": time_limit,
        "gpus": gpus,
        "cpus_per_task": settings.cpus_per_task,
        "mem_gb": settings.mem_gb,
        "constraint": _plain(settings.constraint, "slurm.constraint"),
        "workdir": _path_value(Path(workdir), "the project folder"),
        "array_size": array_size,
        "throttle": min(throttle, array_size),
        "signal_grace_s": settings.signal_grace_s,
        "log_dir": _path_value(log_dir, "slurm.log_dir", pattern=True),
        "extra_directives": extra,
        "setup": list(settings.setup),
        "worker_command": shlex.join(worker_command),
    }
    environment = jinja2.Environment(loader=jinja2.PackageLoader("hparray.sbatch", "."),
                                     undefined=jinja2.StrictUndefined,
                                     trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True,
                                     autoescape=False)
    return environment.get_template(TEMPLATE).render(**context)


def log_dir_of(settings: Settings) -> Path:
    """Where the array tasks' logs go: slurm.log_dir, relative to the project folder."""
    path = Path(settings.slurm.log_dir)
    return path if path.is_absolute() else settings.config_dir.parent / path


# ---------------------------------------------------------------- parsing Slurm's answers


def parse_sbatch(output: str) -> str:
    """The job id from `sbatch --parsable`: `123` or `123;cluster`."""
    lines = [line.strip() for line in output.strip().splitlines() if line.strip()]
    match = re.fullmatch(r"(\d+)(;\S+)?", lines[-1]) if lines else None
    if match is None:
        raise SlurmError(f"sbatch printed {output.strip()!r} instead of a job id: submit by hand to see why")
    return match.group(1)


def parse_max_array_size(config_text: str) -> int:
    """MaxArraySize from `scontrol show config`, or Slurm's default when it is not there."""
    match = re.search(r"^\s*MaxArraySize\s*=\s*(\d+)", config_text, re.M)
    return int(match.group(1)) if match else DEFAULT_MAX_ARRAY_SIZE


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
    shares = [total * size / workers for size in sizes]
    throttles = [max(1, int(share)) for share in shares]
    by_remainder = sorted(range(len(sizes)), key=lambda i: shares[i] - int(shares[i]), reverse=True)
    for i in by_remainder:
        if sum(throttles) >= total:
            break
        throttles[i] += 1
    return [(size, min(size, k)) for size, k in zip(sizes, throttles)]


@dataclass(frozen=True)
class SlurmTask:
    """One line of `squeue -r`: an array task (or a plain job) and its state."""

    key: str                     # %i: 123_4 for array tasks, 123 for plain jobs
    job_id: str                  # %A: the task's own job id (SLURM_JOB_ID inside it)
    array_job_id: str            # %F
    array_task_id: str | None    # %K, None for plain jobs
    state: str                   # %T
    reason: str                  # %r
    started_at: float | None     # %S: start of the current run (a requeued task starts again)

    @property
    def alive(self) -> bool:
        return self.state in ALIVE_STATES

    @property
    def queued(self) -> bool:
        return self.state in QUEUED_STATES


def _timestamp(value: str) -> float | None:
    try:
        return datetime.fromisoformat(value).timestamp()
    except ValueError:  # N/A, Unknown, None
        return None


def parse_squeue(output: str) -> dict[str, SlurmTask]:
    """`squeue -h -r -o SQUEUE_FORMAT` lines -> tasks by %i."""
    tasks: dict[str, SlurmTask] = {}
    for line in output.splitlines():
        parts = line.strip().split("|")
        if len(parts) < 6:
            continue
        key, job_id, array_job_id, array_task_id, state, reason = parts[:6]
        started = _timestamp(parts[6]) if len(parts) > 6 else None
        task_id = array_task_id if array_task_id.isdigit() else None
        # A state may carry a suffix on some versions (CANCELLED by 0): keep the word.
        tasks[key] = SlurmTask(key=key, job_id=job_id, array_job_id=array_job_id, array_task_id=task_id,
                               state=state.split()[0] if state else "", reason=reason, started_at=started)
    return tasks


def _command(argv: Sequence[str], *, stdin: str | None = None, env: dict[str, str] | None = None,
             timeout: float = COMMAND_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    """Run one Slurm client command; a missing command is SlurmUnavailable."""
    if shutil.which(argv[0]) is None:
        raise SlurmUnavailable(f"{argv[0]} not found on PATH: run this on a Slurm login node")
    try:
        return subprocess.run(list(argv), input=stdin, capture_output=True, text=True, timeout=timeout,
                              env=env)
    except subprocess.TimeoutExpired:
        raise SlurmUnavailable(f"{argv[0]} did not answer within {timeout:.0f} s: is slurmctld up? "
                               "(`scontrol ping`)") from None
    except OSError as err:
        raise SlurmUnavailable(f"{argv[0]} could not run ({err.strerror}): check the Slurm client install") from None


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


def query_jobs(job_ids: Iterable[str]) -> dict[str, SlurmTask]:
    """Every task of these jobs that Slurm still knows, in ONE squeue call (by %i).

    A job Slurm has forgotten (finished longer than MinJobAge ago, or cancelled while pending)
    is simply absent; squeue's 'Invalid job id specified', which it gives when it knows none of
    them, means the same. Needs no sacct.
    """
    ids = sorted({str(job_id) for job_id in job_ids if job_id})
    if not ids:
        return {}
    result = _command(["squeue", "-h", "-r", "-j", ",".join(ids), "-o", SQUEUE_FORMAT])
    if result.returncode != 0:
        if "Invalid job id" in result.stderr:
            return {}
        raise SlurmUnavailable(f"squeue failed: {_last_line(result.stderr or result.stdout)}")
    return parse_squeue(result.stdout)


def max_array_size() -> int:
    """This cluster's MaxArraySize (Slurm's default when scontrol cannot tell)."""
    try:
        result = _command(["scontrol", "show", "config"], timeout=30)
    except SlurmUnavailable:
        return DEFAULT_MAX_ARRAY_SIZE
    return parse_max_array_size(result.stdout) if result.returncode == 0 else DEFAULT_MAX_ARRAY_SIZE


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
    submissions = store.fetch("slurm_submissions")
    if not submissions:
        return SlurmView(available=False, problem="nothing submitted to Slurm")
    submitted = {sub.job_id for sub in submissions}
    try:
        tasks = query_jobs(sub.job_id for sub in submissions)
    except SlurmUnavailable as err:
        log.warning("%s; using the heartbeat grace alone", err)
        return SlurmView(available=False, problem=str(err), submissions=submissions)
    view = SlurmView(available=True, submissions=submissions, tasks=tasks)
    for worker in store.fetch("slurm_live_workers"):
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


class StatusWithSlurm:
    """`status` with the Slurm-aware reaper and the sweep's jobs; squeue at most every few seconds
    (for `status --watch`)."""

    def __init__(self, min_interval_s: float = SQUEUE_MIN_INTERVAL_S):
        self.min_interval_s = min_interval_s
        self._view: SlurmView | None = None
        self._asked_at = float("-inf")

    def __call__(self, store: Store, now: float, grace_s: float, heartbeat_interval_s: float) -> SweepStatus:
        released: list[int] = []
        if self._view is None or time.monotonic() - self._asked_at >= self.min_interval_s:
            self._view = observe(store)
            self._asked_at = time.monotonic()
            if self._view.gone_workers:
                report, _ = try_reap(store, now, grace_s, self._view.gone_workers)
                released = report.released + report.failed
        status = sweep_status(store, now, grace_s)
        status.reaped = released + status.reaped
        if self._view.submissions:
            status.slurm_jobs = self._view.jobs()
        if self._view.available:
            # Two missed beats: late enough to mention, well before the grace reaps the row.
            status.hung = hung_rows(store, self._view, now, min(2 * heartbeat_interval_s, grace_s))
        return status


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
    totals = {row.status: row.n for row in store.fetch("task_totals")}
    return max(0, int(totals.get("pending", 0)) - int(store.scalar("blocked_tasks") or 0))


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
    running = int({row.status: row.n for row in store.fetch("task_totals")}.get("running", 0))
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
        result = _command(array.command, env=env)
        if result.returncode != 0:
            done = f" (already submitted: {', '.join(submission.job_ids)})" if submission.job_ids else ""
            why = _last_line(result.stderr or result.stdout)
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
    measured = [] if store is None else sorted(
        row.wall_s for row in store.fetch("durations_by_kind", {"kind": "finetune"}))
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


@dataclass(frozen=True)
class NodeShape:
    """What one node of a partition offers an array task."""

    name: str
    cpus: int
    mem_mb: int
    gpus: int


def parse_sinfo_nodes(output: str, partition: str | None) -> list[NodeShape]:
    """`sinfo -h -N -o '%P|%N|%c|%m|%G'` lines of `partition` (None: the default one, marked *)."""
    nodes = []
    for line in output.splitlines():
        parts = line.strip().split("|")
        if len(parts) < 5:
            continue
        name, node, cpus, mem, gres = parts[:5]
        if (partition is None and not name.endswith("*")) or (partition is not None and name.rstrip("*") != partition):
            continue
        gpus = sum(int(m.group(1)) for m in re.finditer(r"gpu(?::[^:,()]+)?:(\d+)", gres))
        nodes.append(NodeShape(node, int(re.sub(r"\D.*", "", cpus) or 0), int(re.sub(r"\D.*", "", mem) or 0), gpus))
    return nodes


def check_partition_fits(settings: Settings, overrides: Overrides) -> str:
    """Refuse an array task that no node of the partition can run (it would pend forever, reason
    PartitionConfig or Resources); returns what was checked, or '' when Slurm cannot tell."""
    partition = overrides.partition or settings.slurm.partition
    gpus = settings.slurm.gpus_per_task if overrides.gpus is None else overrides.gpus
    cpus, mem_mb = settings.slurm.cpus_per_task, settings.slurm.mem_gb * 1024
    try:
        result = _command(["sinfo", "-h", "-N", "-o", "%P|%N|%c|%m|%G"], timeout=30)
    except SlurmUnavailable:
        return ""
    nodes = parse_sinfo_nodes(result.stdout, partition) if result.returncode == 0 else []
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
    submissions = [sub for sub in store.fetch("slurm_submissions") if sub.state == "submitted"]
    tasks = query_jobs(sub.job_id for sub in submissions)
    live = sorted({task.array_job_id for task in tasks.values() if task.alive or task.queued}, key=int)
    if not live:
        return Cancellation(job_ids=[], released=[], failed=[], still_running=[])
    result = _command(["scancel", *live])
    if result.returncode != 0:
        raise SlurmError(f"scancel failed: {_last_line(result.stderr or result.stdout)}: "
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
    gone = [worker.id for worker in store.fetch("slurm_live_workers")
            if (worker.slurm_array_job_id or worker.slurm_job_id) in live
            and worker_key(worker.slurm_array_job_id, worker.slurm_array_task_id, worker.slurm_job_id) not in still]
    report = store.reap(time.time(), grace_s, gone_workers=gone)
    for job_id in live:
        store.cancel_submission(job_id)
    return Cancellation(job_ids=live, released=report.released, failed=report.failed, still_running=still)

