"""Wiring for `hparray worker`: settings + store + experiment + the job's time budget -> Worker."""

from __future__ import annotations

import logging
import random
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hparray import failpoints, notify
from hparray.config import Settings
from hparray.environment import WorkerIdentity, job_deadline
from hparray.errors import WorkerStopped
from hparray.experiment import Experiment, Produced
from hparray.stopping import with_stopping
from hparray.store import Store
from hparray.tasks import ClaimedTask, TaskOutcome
from hparray.worker.loop import NOTHING_LEFT, CircuitOpen, ConfigMismatch, Interrupted, Worker, WorkerSummary

log = logging.getLogger(__name__)

DURATION_PERCENTILE = 0.9


class TaskClock:
    """Expected task durations: a high percentile of this sweep's finished tasks of the same kind,
    or the config's estimate until there are a few."""

    def __init__(self, store: Store, refresh_every: int = 10):
        self.store = store
        self.refresh_every = refresh_every
        self._cache: dict[str, tuple[int, float | None]] = {}

    def expected(self, task: ClaimedTask) -> float:
        uses, value = self._cache.get(task.kind, (self.refresh_every, None))
        if uses >= self.refresh_every:
            durations = sorted(self.store.durations(task.kind))
            value = durations[min(len(durations) - 1, int(DURATION_PERCENTILE * len(durations)))] \
                if len(durations) >= 3 else None
            uses = 0
        self._cache[task.kind] = (uses + 1, value)
        return value if value is not None else task.estimate_s


def artifact_dirs(store: Store, settings: Settings, task: ClaimedTask) -> list[Path]:
    """results/<search>_search/<config>/<video>/ for every search holding the config;
    un-fine-tuned rows under results/baseline_inference/cf_<N>/<video>/."""
    root = settings.output_path()
    if task.kind == "baseline":
        return [root / "baseline_inference" / f"cf_{task.condition_frames}" / task.video]
    names = store.config_names(task.config_hash)
    return [root / f"{row.search}_search" / row.name / task.video for row in names]


STAGE_HOLD_ENV = "HPARRAY_FAILPOINT_STAGE_HOLD"
"""A failpoint (hparray.failpoints) where a row entering the background stage leaves `staged-<id>`,
so a test can kill a worker that certainly holds one row in its stage and another in its runner."""


def held_in_stage(produced: Produced) -> Produced:
    """`produced`, once the failpoint (if set) lets it through; see STAGE_HOLD_ENV."""
    failpoints.hold(STAGE_HOLD_ENV, f"staged-{produced.task.id}")
    return produced


SLURM_REAP_EVERY_S = 60.0
"""How often a worker of a sweep submitted to Slurm asks squeue which array tasks are gone (rows of
tasks Slurm no longer runs come back at once, not after the grace); squeue is not for tight loops."""


def reaper(settings: Settings, store: Store) -> dict[str, Any]:
    """The worker's reaper: Slurm-aware (one squeue per pass) when this sweep was submitted to Slurm
    and squeue answers here, else the heartbeat reaper alone."""
    grace_s = settings.tasks.heartbeat_grace_s
    if not (shutil.which("squeue") and store.submissions()):
        return {}
    from hparray import slurm

    every = min(grace_s / 4, SLURM_REAP_EVERY_S) * random.uniform(0.8, 1.2)  # workers started together spread out
    return {"reap": lambda now: slurm.reap(store, now, grace_s).report, "reap_every_s": every}


def run_worker(settings: Settings, store: Store, *, max_tasks: int | None = None, worker_id: str | None = None,
               poll_s: float = 2.0) -> WorkerSummary:
    """Run one worker process to completion."""
    identity = WorkerIdentity.from_environment(worker_id)
    clock = TaskClock(store)
    # The experiment (runner, scorer, model) is built inside the start-up window below; the worker
    # reaches it through these calls.
    loaded: list[Experiment] = []

    def complete(produced: Produced) -> TaskOutcome:
        return loaded[0].score(held_in_stage(produced), artifact_dirs(store, settings, produced.task))

    def generate(task: ClaimedTask) -> Produced:
        return loaded[0].generate(task)

    # With background scoring, row N is scored in the worker's stage while row N+1 generates.
    execute: Callable[[ClaimedTask], Any] = generate
    if not settings.tasks.background_scoring:
        execute = lambda task: complete(generate(task))  # noqa: E731  (one row at a time: the GPU waits)

    worker = Worker(
        store, execute, identity, complete=complete if execute is generate else None,
        heartbeat_interval_s=settings.tasks.heartbeat_interval_s,
        heartbeat_grace_s=settings.tasks.heartbeat_grace_s, max_tasks=max_tasks, poll_s=poll_s,
        deadline=job_deadline(), signal_grace_s=settings.slurm.signal_grace_s, expected_duration=clock.expected,
        check=lambda task: loaded[0].matches_plan(task),
        settle=with_stopping(settings, store, lambda outcome, won: loaded[0].settle(outcome, won)),
        circuit_breaker=settings.tasks.circuit_breaker, prepare=lambda: loaded[0].load(), **reaper(settings, store),
        on_failed=lambda task_id: notify.row_failed(settings, store, task_id, identity.id),
    )
    worker.catch_stop_signals()  # before anything slow: a stop during start-up must exit cleanly
    log.info("worker %s starting (pid %d, gpu %s)", identity.id, identity.pid, identity.gpu)
    started = time.time()
    # Load before the first claim: a row is never held through a slow model load, and a worker
    # stopped or killed while loading loses no work.
    try:
        with worker.loading():
            loaded.append(Experiment(settings))
            loaded[0].load()
    except Interrupted as why:
        log.info("stopped while loading the model (%s): nothing was claimed", why)
        return WorkerSummary(stop_reason=f"{why} while loading the model, before the first claim")
    log.info("model loaded in %.1f s", time.time() - started)
    try:
        summary = worker.run()
    except (ConfigMismatch, CircuitOpen) as err:
        raise WorkerStopped(str(err)) from None
    finally:
        loaded[0].close()
    log.info("worker %s stopped after %.0f s: %s", identity.id, time.time() - started, summary.stop_reason)
    if summary.stop_reason == NOTHING_LEFT:  # the last worker out tells (once, however many end together)
        notify.sweep_finished(settings, store, identity.id)
    return summary
