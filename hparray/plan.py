"""The planner: searches x videos -> task rows, with identical work planned once.

A config is identified by a content hash of its effective hyperparameters and of everything
else that decides its result (runner, model, frame geometry, seed), so the baseline point that
all three searches contain is one config, and the un-fine-tuned inference that every fine-tune
row with the same condition_frames is compared against is one row per (video, condition_frames).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hparray.config import Search, Settings, SweepConfig, format_value
from hparray.errors import StoreError
from hparray.runners import Hyperparams
from hparray.runners.protocol import build_runner, describe_runner, runner_identity
from hparray.store import PlanCounts, Store
from hparray.tasks import TaskSpec
from hparray.videos import VideoRef, check_videos, list_videos, stratified_sample

BASELINE_PRIORITY = 0
FINETUNE_PRIORITY = 1


@dataclass
class PlannedConfig:
    """One distinct piece of work per video: a fine-tune config or an un-fine-tuned inference."""

    hash: str
    kind: str
    hp: Hyperparams
    params: dict[str, Any]
    names: dict[str, str] = field(default_factory=dict)  # search -> name in that search
    baseline_in: set[str] = field(default_factory=set)  # searches where this is the baseline point
    values: dict[str, float] = field(default_factory=dict)  # search -> its value, when not an hp (confirm)

    @property
    def label(self) -> str:
        if self.kind == "baseline":
            return f"baseline_cf_{self.hp.condition_frames}"
        return " = ".join(dict.fromkeys(self.names.values()))


@dataclass
class Plan:
    """Everything `plan` would write, computed without touching the database."""

    settings: Settings
    searches: list[Search]
    configs: list[PlannedConfig]
    videos: list[VideoRef]
    tasks: list[TaskSpec]

    def gpu_hours(self, tasks: list[TaskSpec] | None = None) -> float:
        return sum(task.estimate_s for task in (self.tasks if tasks is None else tasks)) / 3600.0

    def largest_condition_frames(self) -> dict[str, int]:
        """{kind: the most conditioning frames of a planned row of that kind} (memory grows with them)."""
        largest: dict[str, int] = {}
        for config in self.configs:
            largest[config.kind] = max(largest.get(config.kind, 0), config.hp.condition_frames)
        return largest

    def config_rows(self) -> list[dict[str, Any]]:
        return [{"hash": c.hash, "kind": c.kind, "lr": c.hp.lr if c.kind == "finetune" else None,
                 "condition_frames": c.hp.condition_frames,
                 "finetune_steps": c.hp.finetune_steps if c.kind == "finetune" else None,
                 "params": json.dumps(c.params, sort_keys=True)} for c in self.configs]

    def search_config_rows(self) -> list[dict[str, Any]]:
        rows = []
        for search in self.searches:
            for config in self.configs:
                if search.name in config.names:
                    rows.append({"search": search.name, "config_hash": config.hash,
                                 "name": config.names[search.name], "parameter": search.parameter,
                                 "value": float(config.values[search.name] if search.name in config.values
                                                else getattr(config.hp, search.parameter)),
                                 "is_baseline": int(search.name in config.baseline_in)})
        return rows

    def video_rows(self) -> list[dict[str, Any]]:
        return [{"name": v.name, "path": v.path, "category": v.category, "caption": v.caption,
                 "seed": video_seed(v.name)} for v in self.videos]


def config_hash(kind: str, hp: Hyperparams, settings: Settings, model_identity: str | None = None
                ) -> tuple[str, dict[str, Any]]:
    """Content hash of what decides a task's result; the same on every machine and Python.

    `model_identity` is the runner's own name for the model it runs (`Runner.identity()`), when
    the settings alone do not say (the built-in weights' digest, a resident server's model)."""
    params: dict[str, Any] = {"kind": kind, "condition_frames": hp.condition_frames,
                              "experiment": settings.experiment_fingerprint()}
    if kind == "finetune":
        params.update(lr=hp.lr, finetune_steps=hp.finetune_steps)
    if model_identity is not None:
        params["model_identity"] = model_identity
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]
    return digest, params


def model_description(settings: Settings) -> str:
    """One line naming the model the rows will run, for the plan shown before GPU time is spent."""
    return describe_runner(settings)


def video_seed(name: str) -> int:
    """A fixed seed per video, so the baseline and every fine-tuned run of it share their noise."""
    return int(hashlib.sha256(name.encode()).hexdigest()[:8], 16)


def task_seed(settings_seed: int, video_seed_value: int) -> int:
    """The seed a runner gets for one video under the sweep's global seed."""
    return (settings_seed * 1_000_003 + video_seed_value) % (2**31 - 1)


def select_videos(settings: Settings, cache_dir: Path | None = None) -> list[VideoRef]:
    """The sweep's videos: stratified sample of the source, every one checked for length."""
    chosen = sampled_videos(settings, cache_dir)
    check_videos(chosen, settings.data.num_frames)
    return chosen


def sampled_videos(settings: Settings, cache_dir: Path | None = None) -> list[VideoRef]:
    """The sweep's videos as the plan chose them, without reading any (what workers prepare for)."""
    pool = list_videos(settings.data.source, config_dir=settings.config_dir, cache_dir=cache_dir)
    return stratified_sample(pool, settings.data.num_videos, settings.seed, settings.data.stratify_by)


def build_plan(sweep: SweepConfig, which: str, videos: list[VideoRef]) -> Plan:
    """Expand the chosen searches one factor at a time around the baseline, deduplicated by hash."""
    settings = sweep.settings
    searches = sweep.select(which)
    base = settings.baseline
    identity = runner_identity(build_runner(settings))
    finetunes: dict[str, PlannedConfig] = {}
    for search in searches:
        for value in search.values:
            hp = Hyperparams(lr=base.lr, condition_frames=base.condition_frames, finetune_steps=base.finetune_steps)
            hp = Hyperparams(**{**hp.__dict__, search.parameter: value})
            digest, params = config_hash("finetune", hp, settings, identity)
            config = finetunes.setdefault(digest, PlannedConfig(digest, "finetune", hp, params))
            config.names[search.name] = f"{search.prefix}_{format_value(value)}"
            if value == getattr(base, search.parameter):
                config.baseline_in.add(search.name)
    return plan_rows(settings, searches, list(finetunes.values()), videos)


def plan_rows(settings: Settings, searches: list[Search], finetunes: list[PlannedConfig],
              videos: list[VideoRef]) -> Plan:
    """The rows of these fine-tune configs on these videos, and the un-fine-tuned inference rows
    (one per video and condition_frames) they are compared with and wait for."""
    identity = runner_identity(build_runner(settings))
    baselines: dict[int, PlannedConfig] = {}
    for config in finetunes:
        cf = config.hp.condition_frames
        if cf not in baselines:
            hp = Hyperparams(lr=0.0, condition_frames=cf, finetune_steps=0)
            digest, params = config_hash("baseline", hp, settings, identity)
            baselines[cf] = PlannedConfig(digest, "baseline", hp, params)

    baseline_s = settings.tasks.baseline_gpu_minutes * 60.0
    finetune_s = settings.tasks.gpu_minutes_per_task * 60.0
    tasks = [TaskSpec(config_hash=b.hash, video=v.name, kind="baseline", priority=BASELINE_PRIORITY,
                      estimate_s=baseline_s)
             for b in sorted(baselines.values(), key=lambda c: c.hp.condition_frames) for v in videos]
    # Video-major: a half-finished sweep has every config on the same first videos, so its
    # partial results can already be compared per video.
    tasks += [TaskSpec(config_hash=c.hash, video=v.name, kind="finetune", priority=FINETUNE_PRIORITY,
                       estimate_s=finetune_s,
                       depends_on=(baselines[c.hp.condition_frames].hash, v.name))
              for v in videos for c in finetunes]
    configs = sorted(baselines.values(), key=lambda c: c.hp.condition_frames) + list(finetunes)
    return Plan(settings=settings, searches=searches, configs=configs, videos=videos, tasks=tasks)


def apply(store: Store, plan: Plan, now: float) -> PlanCounts:
    """Write the plan's rows (idempotent: rows already there are never touched)."""
    tasks = plan.settings.tasks
    return store.apply_plan(plan.config_rows(), plan.search_config_rows(), plan.video_rows(), plan.tasks,
                            tasks.max_attempts, now, max_losses=tasks.max_losses)


def existing_rows(db: str | None) -> set[tuple[str, str]]:
    """Rows already planned, without creating a database that does not exist yet (`plan --dry-run`)."""
    try:
        store = Store.open(db, create=False)
    except StoreError as err:
        if "no database" in str(err):
            return set()
        raise
    try:
        return store.existing_task_keys()
    finally:
        store.close()
