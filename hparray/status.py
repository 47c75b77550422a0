"""Where a sweep stands: rows per search and config, live workers, throughput and ETA.

Computed here, rendered by the CLI; `status` also runs the reaper first, so what it shows is
never older than the heartbeat grace period.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from hparray.errors import StoreError
from hparray.store import ReapReport, Store
from hparray.tasks import STATUSES

THROUGHPUT_WINDOW_S = 3600.0
FAILED_ROWS_SHOWN = 20


@dataclass
class ConfigStatus:
    """One config's rows; `search` is 'baseline inference' for the un-fine-tuned rows."""

    search: str
    name: str
    hash: str
    kind: str
    parameter: str | None
    value: float | None
    is_baseline: bool
    total: int
    pending: int
    running: int
    done: int
    diverged: int
    failed: int
    psnr: float | None
    ssim: float | None
    lpips: float | None
    gpu_minutes: float


@dataclass
class WorkerStatus:
    id: str
    host: str
    pid: int
    gpu: str | None
    slurm_job_id: str | None
    slurm_array_job_id: str | None
    slurm_array_task_id: str | None
    task: str | None
    tasks_done: int
    heartbeat_age_s: float
    stale: bool


@dataclass
class SweepStatus:
    total: int
    pending: int
    running: int
    done: int
    diverged: int
    failed: int
    blocked: int
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
        data = asdict(self)
        data["searches"] = {name: [asdict(c) for c in configs] for name, configs in self.searches().items()}
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
    per_config = {row.hash: row for row in store.fetch("status_configs")}
    configs: list[ConfigStatus] = []
    for membership in store.fetch("search_configs"):
        row = per_config.get(membership.config_hash)
        if row is not None:
            configs.append(_config_status(membership.search, membership.name, row, membership.parameter,
                                          membership.value, bool(membership.is_baseline)))
    for row in sorted(per_config.values(), key=lambda r: r.condition_frames):
        if row.kind == "baseline":
            configs.append(_config_status("baseline inference", f"no_finetune_cf_{row.condition_frames}", row,
                                          "condition_frames", row.condition_frames, False))

    totals = {status: 0 for status in STATUSES}
    totals.update({row.status: row.n for row in store.fetch("task_totals")})
    recent = store.fetch("finished_since", {"since": now - THROUGHPUT_WINDOW_S})[0]
    workers = [_worker_status(row, now, grace_s) for row in store.fetch("live_workers")]
    live = max(1, sum(1 for worker in workers if not worker.stale))
    blocked = int(store.scalar("blocked_tasks") or 0)
    remaining = totals["pending"] - blocked + totals["running"]  # a blocked row runs only after a retry
    # Rows per hour over the last hour, or over the sweep's life when it is younger than that.
    window = THROUGHPUT_WINDOW_S
    if recent.n and recent.first_claimed_at is not None:
        window = min(window, max(60.0, now - recent.first_claimed_at))
    throughput = float(recent.n or 0) * 3600.0 / window
    if recent.n and recent.mean_wall_s:
        eta: float | None = remaining * recent.mean_wall_s / live
    elif remaining:
        eta = float(store.scalar("remaining_estimate") or 0.0) / live if workers else None
    else:
        eta = 0.0
    return SweepStatus(
        total=sum(totals.values()), pending=totals["pending"], running=totals["running"], done=totals["done"],
        diverged=totals["diverged"], failed=totals["failed"], blocked=blocked,
        gpu_minutes=sum(float(row.wall_s or 0.0) for row in per_config.values()) / 60.0,
        throughput_per_hour=throughput, eta_s=eta, reaped=reaped.released + reaped.failed,
        database={"url": _redact(store.url), "dialect": store.dialect, "journal_mode": store.journal_mode or None,
                  "filesystem": store.filesystem or None, "schema_version": store.schema_version()},
        configs=configs, workers=workers, reap_problem=reap_problem,
        failed_rows=[{"task_id": row.id, "kind": row.kind, "config": row.config_name, "video": row.video,
                      "errors": row.errors, "losses": row.losses, "error": row.error or ""}
                     for row in store.fetch("failed_rows", {"limit": FAILED_ROWS_SHOWN})] if totals["failed"] else [],
    )


def _config_status(search: str, name: str, row: Any, parameter: str | None, value: float | None,
                   is_baseline: bool) -> ConfigStatus:
    return ConfigStatus(
        search=search, name=name, hash=row.hash, kind=row.kind, parameter=parameter, value=value,
        is_baseline=is_baseline, total=row.total, pending=row.pending or 0, running=row.running or 0,
        done=row.done or 0, diverged=row.diverged or 0, failed=row.failed or 0,
        psnr=row.psnr, ssim=row.ssim, lpips=row.lpips, gpu_minutes=float(row.wall_s or 0.0) / 60.0,
    )


def _worker_status(row: Any, now: float, grace_s: float) -> WorkerStatus:
    age = max(0.0, now - row.heartbeat_at)
    task = f"{row.task_kind} {row.task_video} (#{row.current_task})" if row.current_task else None
    return WorkerStatus(
        id=row.id, host=row.host, pid=row.pid, gpu=row.gpu, slurm_job_id=row.slurm_job_id,
        slurm_array_job_id=row.slurm_array_job_id, slurm_array_task_id=row.slurm_array_task_id,
        task=task, tasks_done=row.tasks_done, heartbeat_age_s=age, stale=age > grace_s,
    )


def _redact(url: str) -> str:
    """The URL without its password, fit for a terminal or a JSON file."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        credentials, host = rest.rsplit("@", 1)
        user = credentials.split(":", 1)[0]
        return f"{scheme}://{user}:***@{host}" if ":" in credentials else url
    return url
