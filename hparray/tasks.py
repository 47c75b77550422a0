"""The records that travel between planner, store, worker and experiment."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

TASK_KINDS = ("baseline", "finetune")
FINAL_STATUSES = ("done", "diverged", "failed")
STATUSES = ("pending", "running", "done", "diverged", "failed", "skipped")
# skipped: a pending row of a config that sequential stopping stopped (never claimed; pending again
# when stopping is turned off)


@dataclass(frozen=True)
class TaskSpec:
    """One row the planner wants: (config hash, video), its dependency named by the same key."""

    config_hash: str
    video: str
    kind: str
    priority: int
    estimate_s: float
    depends_on: tuple[str, str] | None = None  # (config_hash, video) of the baseline row it needs


@dataclass(frozen=True)
class ClaimedTask:
    """A row a worker holds; `lease` fences every write it makes about it."""

    id: int
    lease: str
    attempt: int
    max_attempts: int
    kind: str
    config_hash: str
    video: str
    video_path: str
    category: str
    caption: str | None
    video_seed: int
    lr: float | None
    condition_frames: int
    finetune_steps: int | None
    estimate_s: float


@dataclass
class TaskOutcome:
    """What running one task produced; `status` is 'done' or 'diverged' (metrics then missing)."""

    status: str
    metrics: dict[str, float] = field(default_factory=dict)
    trivial_metrics: dict[str, float] = field(default_factory=dict)
    timings_s: dict[str, float] = field(default_factory=dict)
    peak_memory_mb: float | None = None
    lpips_weights: str | None = None
    artifact_dir: str | None = None  # where the artifacts are once published (recorded with the result)
    details: dict[str, Any] = field(default_factory=dict)
    per_frame: dict[str, Any] = field(default_factory=dict)  # {"first_frame": cf, metric: [...], trivial_...}
    staged_dir: str | None = None  # this attempt's private copy, published only if it wins its finish
