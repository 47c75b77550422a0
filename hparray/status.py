"""Where a sweep stands: rows per search and config, live workers, throughput and ETA.

Computed here, rendered by the CLI; `status` also runs the reaper first, so what it shows is
never older than the heartbeat grace period.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

from hparray.errors import StoreError
from hparray.slurm.sweep import SQUEUE_MIN_INTERVAL_S, SlurmView, hung_rows, observe
from hparray.store import ReapReport, Store, TaskCounts, redact_url
from hparray.store.records import ConfigProgress, LiveWorker

THROUGHPUT_WINDOW_S = 3600.0
FAILED_ROWS_SHOWN = 20


@dataclass(frozen=True)
class ConfigStatus(ConfigProgress):
    """One config's rows as a member of one search; `search` is 'baseline inference' for the
    un-fine-tuned rows."""

    search: str
    name: str
    parameter: str | None
    value: float | None
    is_baseline: bool

    @property
    def gpu_minutes(self) -> float:
        return float(self.wall_s or 0.0) / 60.0


@dataclass(frozen=True)
class WorkerStatus(LiveWorker):
    """A live worker, with how long its heartbeat has been still (on this host's clock, when it
    has watched it; see docs/faults.md) and whether that is past the grace."""

    heartbeat_age_s: float
    stale: bool

    @property
    def task(self) -> str | None:
        return f"{self.task_kind} {self.task_video} (#{self.current_task})" if self.current_task else None


@dataclass
class SweepStatus:
    """Where a sweep stands; `to_json` lays the row counts out at the top level (`total`, `pending`, ...)."""

    counts: TaskCounts
    gpu_minutes: float
    throughput_per_hour: float
    eta_s: float | None
    reaped: list[int]
    database: dict[str, Any]
    reap_problem: str = ""  # why the reaper could not run (a read-only database, a stuck writer)
    failed_rows: list[dict[str, Any]] = field(default_factory=list)  # the first few, with their errors
    configs: list[ConfigStatus] = field(default_factory=list)
    workers: list[WorkerStatus] = field(default_factory=list)
    # Filled by hparray.slurm when the sweep was submitted to Slurm: its jobs as squeue sees them,
    # and running rows whose heartbeat is late while Slurm says their task runs.
    slurm_jobs: list[dict[str, Any]] = field(default_factory=list)
    hung: list[dict[str, Any]] = field(default_factory=list)

    def searches(self) -> dict[str, list[ConfigStatus]]:
        grouped: dict[str, list[ConfigStatus]] = {}
        for config in self.configs:
            grouped.setdefault(config.search, []).append(config)
        return grouped

    def to_json(self) -> dict[str, Any]:
        data = {**asdict(self.counts), "total": self.counts.total, **asdict(self)}
        del data["counts"]
        data["searches"] = {name: [{**asdict(c), "gpu_minutes": c.gpu_minutes} for c in configs]
                            for name, configs in self.searches().items()}
        data["workers"] = [{**asdict(w), "task": w.task} for w in self.workers]
        del data["configs"]
        return data


def try_reap(store: Store, now: float, grace_s: float, gone_workers: list[str] | None = None) -> tuple[
        ReapReport, str]:
    """Reap for a reading command: a database it cannot write (read-only, or held by a stuck writer)
    must not stop it from showing what is there; the second value says why nothing was reaped."""
    if store.readonly:
        return ReapReport([], []), "the database is read-only here, so no row of a dead worker was put back"
    try:
        return store.reap(now, grace_s, gone_workers=gone_workers or ()), ""
    except StoreError as err:
        return ReapReport([], []), f"could not reap: {err}"


def sweep_status(store: Store, now: float, grace_s: float) -> SweepStatus:
    """Reap stale rows, then read the whole picture in a handful of grouped queries."""
    reaped, reap_problem = try_reap(store, now, grace_s)
    per_config = {row.hash: row for row in store.config_progress()}
    configs: list[ConfigStatus] = []
    for membership in store.search_members():
        row = per_config.get(membership.config_hash)
        if row is not None:
            configs.append(_config_status(membership.search, membership.name, row, membership.parameter,
                                          membership.value, bool(membership.is_baseline)))
    for row in sorted(per_config.values(), key=lambda r: r.condition_frames):
        if row.kind == "baseline":
            configs.append(_config_status("baseline inference", f"no_finetune_cf_{row.condition_frames}", row,
                                          "condition_frames", row.condition_frames, False))

    counts = store.task_counts()
    recent = store.finished_since(now - THROUGHPUT_WINDOW_S)
    workers = [_worker_status(row, now, grace_s) for row in store.live_workers()]
    live = max(1, sum(1 for worker in workers if not worker.stale))
    remaining = counts.to_run  # a blocked row runs only after a retry
    # Rows per hour over the last hour, or over the sweep's life when it is younger than that.
    window = THROUGHPUT_WINDOW_S
    if recent.n and recent.first_claimed_at is not None:
        window = min(window, max(60.0, now - recent.first_claimed_at))
    throughput = float(recent.n or 0) * 3600.0 / window
    if recent.n and recent.mean_wall_s:
        eta: float | None = remaining * recent.mean_wall_s / live
    elif remaining:
        eta = store.remaining_estimate_s() / live if workers else None
    else:
        eta = 0.0
    return SweepStatus(
        counts=counts, gpu_minutes=sum(float(row.wall_s or 0.0) for row in per_config.values()) / 60.0,
        throughput_per_hour=throughput, eta_s=eta, reaped=reaped.released + reaped.failed,
        database={"url": redact_url(store.url), "dialect": store.dialect, "journal_mode": store.journal_mode or None,
                  "filesystem": store.filesystem or None, "schema_version": store.schema_version()},
        configs=configs, workers=workers, reap_problem=reap_problem,
        failed_rows=[{"task_id": row.id, "kind": row.kind, "config": row.config_name, "video": row.video,
                      "errors": row.errors, "losses": row.losses, "error": row.error or ""}
                     for row in store.failed_rows(FAILED_ROWS_SHOWN)] if counts.failed else [],
    )


def _config_status(search: str, name: str, row: ConfigProgress, parameter: str | None, value: float | None,
                   is_baseline: bool) -> ConfigStatus:
    return ConfigStatus(**asdict(row), search=search, name=name, parameter=parameter, value=value,
                        is_baseline=is_baseline)


def _worker_status(row: LiveWorker, now: float, grace_s: float) -> WorkerStatus:
    age = max(0.0, now - row.heartbeat_at)
    return WorkerStatus(**asdict(row), heartbeat_age_s=age, stale=age > grace_s)


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

