"""What the store hands back: one frozen record per question, so callers never index rows by a
query's column names (and the task counts are computed in one place)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PlanCounts:
    """What applying a plan did: rows added and rows that were already there."""

    new_tasks: int
    existing_tasks: int
    new_configs: int


@dataclass(frozen=True)
class ReapReport:
    """Rows the reaper gave back (pending again) or gave up on (failed)."""

    released: list[int]
    failed: list[int]


@dataclass(frozen=True)
class TaskCounts:
    """Rows by status, and the pending rows that wait behind a failed or diverged dependency."""

    pending: int = 0
    running: int = 0
    done: int = 0
    diverged: int = 0
    failed: int = 0
    skipped: int = 0  # left out by sequential stopping; pending again when it is turned off
    blocked: int = 0  # pending, but runnable only after their dependency is retried

    @property
    def total(self) -> int:
        return self.pending + self.running + self.done + self.diverged + self.failed + self.skipped

    @property
    def finished(self) -> int:
        """Rows that will not run again unless retried or resumed: done, diverged, failed or skipped."""
        return self.done + self.diverged + self.failed + self.skipped

    @property
    def runnable(self) -> int:
        """Pending rows a worker could claim now or once their dependency is done."""
        return max(0, self.pending - self.blocked)

    @property
    def to_run(self) -> int:
        """Rows a run would still work through: runnable, or running (maybe under dead workers)."""
        return self.runnable + self.running


@dataclass(frozen=True)
class ConfigProgress:
    """One config's rows by status, its mean metrics so far and the wall time spent."""

    hash: str
    kind: str
    lr: float | None
    condition_frames: int
    finetune_steps: int | None
    total: int
    pending: int
    running: int
    done: int
    diverged: int
    failed: int
    skipped: int
    psnr: float | None
    ssim: float | None
    lpips: float | None
    wall_s: float | None


@dataclass(frozen=True)
class SearchMember:
    """A config as a member of one search (the baseline point belongs to every search)."""

    search: str
    config_hash: str
    name: str
    parameter: str
    value: float
    is_baseline: int


@dataclass(frozen=True)
class LiveWorker:
    """A worker that has not stopped, with the row it holds."""

    id: str
    host: str
    pid: int
    gpu: str | None
    slurm_job_id: str | None
    slurm_array_job_id: str | None
    slurm_array_task_id: str | None
    heartbeat_at: float
    started_at: float
    tasks_done: int
    current_task: int | None
    task_kind: str | None
    task_video: str | None


@dataclass(frozen=True)
class RecentRows:
    """Rows finished since a moment: how many, their mean wall time, when the first was claimed."""

    n: int
    mean_wall_s: float | None
    first_at: float | None
    first_claimed_at: float | None


@dataclass(frozen=True)
class FailedRow:
    """A row that failed for good, with what it last raised."""

    id: int
    kind: str
    video: str
    errors: int
    losses: int
    error: str | None
    config_name: str


@dataclass(frozen=True)
class RunningTask:
    """A running row with its liveness counter and the Slurm ids of the worker holding it."""

    id: int
    lease: str
    worker_id: str
    heartbeat_at: float | None
    beats: int
    losses: int
    max_losses: int
    slurm_job_id: str | None
    slurm_array_job_id: str | None
    slurm_array_task_id: str | None


@dataclass(frozen=True)
class SubmissionRecord:
    """One job array `hparray submit` queued."""

    id: int
    job_id: str
    array_size: int
    throttle: int
    submitted_at: float
    state: str


@dataclass(frozen=True)
class SlurmWorker:
    """A live worker that runs inside a Slurm job (the reaper asks squeue about it)."""

    id: str
    started_at: float
    slurm_job_id: str | None
    slurm_array_job_id: str | None
    slurm_array_task_id: str | None


@dataclass(frozen=True)
class ConfigName:
    """The name a config has in one search (lr_1e-5, cf_22, steps_20: one config, three names)."""

    search: str
    name: str


@dataclass(frozen=True)
class ReportRow:
    """A task once per search that holds its config (fine-tune rows), or once with no search
    (un-fine-tuned rows), with its video, its result if any and its dependency's status."""

    task_id: int
    kind: str
    status: str
    video: str
    config_hash: str
    lr: float | None
    condition_frames: int
    finetune_steps: int | None
    category: str
    video_path: str
    search: str | None
    name: str | None
    parameter: str | None
    value: float | None
    is_baseline: int | None
    psnr: float | None
    ssim: float | None
    lpips: float | None
    trivial_psnr: float | None
    trivial_ssim: float | None
    trivial_lpips: float | None
    finetune_s: float | None
    inference_s: float | None
    wall_s: float | None
    artifact_dir: str | None
    per_frame: str | None  # JSON: {"first_frame": cf, metric: [per-frame values], "trivial_<metric>": [...]}
    depends_status: str | None
    estimate_s: float


@dataclass(frozen=True)
class StopRecord:
    """A config that sequential stopping stopped (migration 0004): against which search's baseline,
    after how many paired videos, with which one-sided p and boundary, and how many rows it skipped."""

    config_hash: str
    search: str
    metric: str
    videos: int
    planned: int
    looks: int
    p_value: float
    window_p_value: float | None  # on the search's common window of frames, where its configs differ in them
    boundary: float
    skipped: int
    stopped_at: float
