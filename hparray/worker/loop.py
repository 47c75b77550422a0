"""The worker loop: claim -> run -> record -> claim, until nothing is left it could run.

It never writes SQL (the store does) and never computes metrics (the experiment does). It
heartbeats from a thread whose errors never reach the task, and on SIGTERM, SIGINT or Slurm's
warning (SIGUSR1) it puts its row back without spending an attempt.
"""

from __future__ import annotations

import logging
import re
import signal
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

from hparray.environment import WorkerIdentity
from hparray.store import ReapReport, Store
from hparray.tasks import ClaimedTask, TaskOutcome

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class Interrupted(BaseException):
    """Raised inside the running task when the worker must give its row back now.

    A BaseException, like KeyboardInterrupt, so that a runner's `except Exception` cannot
    swallow it and keep a row the worker was told to give back."""


class ConfigMismatch(Exception):
    """The worker's settings would not produce what the plan promised for a row."""


class CircuitOpen(Exception):
    """The same error on several different rows in a row: the fault is the node's, not the rows'."""


def error_signature(err: BaseException) -> str:
    """An error's kind for the circuit breaker: its class and message with the parts that name one
    row (quoted paths, numbers) blanked, so "disk full at /a/1.npz" and "at /b/2.npz" match."""
    message = str(err).splitlines()[0] if str(err) else ""
    message = re.sub(r"'[^']*'|\"[^\"]*\"", "'…'", message)
    return f"{type(err).__name__}: {re.sub(r'[0-9]+', '#', message)[:120]}"


@dataclass
class WorkerSummary:
    done: int = 0
    diverged: int = 0
    errors: int = 0
    released: int = 0
    fenced: int = 0
    stop_reason: str = ""
    durations_s: list[float] = field(default_factory=list)


class Heartbeat:
    """Beats for one task from a daemon thread; a failed beat is logged and retried, never raised."""

    def __init__(self, store: Store, task: ClaimedTask, worker_id: str, interval_s: float,
                 clock: Callable[[], float]):
        self.store, self.task, self.worker_id = store, task, worker_id
        self.interval_s, self.clock = interval_s, clock
        self.lease_lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"heartbeat-{task.id}", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                if not self.store.heartbeat(self.task, self.worker_id, self.clock()) and not self.lease_lost:
                    self.lease_lost = True
                    log.warning("task %s: lease lost (reaped?); its result will be discarded", self.task.id)
            except Exception as err:  # the task must outlive a flaky database
                log.warning("task %s: heartbeat failed (%s); retrying in %.0f s", self.task.id, err,
                            self.interval_s)


Execute = Callable[[ClaimedTask], TaskOutcome]


class Worker:
    """Runs tasks from `store` with `execute` until none is claimable, `max_tasks`, or a signal."""

    def __init__(self, store: Store, execute: Execute, identity: WorkerIdentity, *,
                 heartbeat_interval_s: float, heartbeat_grace_s: float, max_tasks: int | None = None,
                 poll_s: float = 2.0, deadline: float | None = None, signal_grace_s: float = 0.0,
                 expected_duration: Callable[[ClaimedTask], float] | None = None,
                 check: Callable[[ClaimedTask], bool] | None = None,
                 settle: Callable[[TaskOutcome, bool], None] | None = None, circuit_breaker: int = 3,
                 reap: Callable[[float], ReapReport] | None = None, reap_every_s: float | None = None,
                 prepare: Callable[[], None] | None = None,
                 clock: Callable[[], float] = time.time, sleep: Callable[[float], None] = time.sleep):
        self.store, self.execute, self.identity = store, execute, identity
        self.heartbeat_interval_s, self.heartbeat_grace_s = heartbeat_interval_s, heartbeat_grace_s
        self.max_tasks, self.poll_s = max_tasks, poll_s
        self.deadline, self.signal_grace_s = deadline, signal_grace_s
        self.expected_duration = expected_duration or (lambda task: task.estimate_s)
        self.check = check
        self.settle = settle or (lambda outcome, won: None)
        self.circuit_breaker = circuit_breaker
        self.reap = reap or (lambda now: store.reap(now, heartbeat_grace_s))
        self.reap_every_s = heartbeat_grace_s / 4 if reap_every_s is None else reap_every_s
        self.prepare = prepare or (lambda: None)
        self._failures: list[tuple[str, int, str]] = []  # (signature, row, message): the failures in a row
        self.clock, self.sleep = clock, sleep
        self.summary = WorkerSummary()
        self._signal: int | None = None
        self._task_started: float | None = None
        self._current: ClaimedTask | None = None
        self._finish_then_stop = False
        self._last_reap = 0.0
        self._loading = False
        self._stopped = False

    # ------------------------------------------------------------------ signals

    def catch_stop_signals(self) -> None:
        """Take SIGTERM, SIGINT and SIGUSR1 from here on, for good. Called first thing in a worker
        process: a stop that arrives while the model loads must end the process cleanly (exit 0,
        nothing claimed), not kill it; and once stopping, a second signal (slurmstepd and the batch
        script both send TERM) must not kill a worker that already gave its row back."""
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._on_signal)

    @contextmanager
    def loading(self) -> Iterator[None]:
        """While the model loads, a stop signal aborts the load (there is no row to give back)."""
        self._loading = True
        try:
            if self._signal is not None:
                raise Interrupted(f"{signal.Signals(self._signal).name} received")
            yield
        finally:
            self._loading = False

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self._stopped:
            log.info("%s: already stopping", name)
            return
        self._signal = signum
        if self._loading:
            raise Interrupted(f"{name} received")
        if self._current is None or self._task_started is None:
            log.info("%s: stopping before the next task", name)
            return
        if signum == signal.SIGUSR1 and self._fits_in_grace():
            log.info("%s: the current task fits in the %.0f s grace; finishing it, then stopping", name,
                     self.signal_grace_s)
            self._finish_then_stop = True
            return
        raise Interrupted(f"{name} received")

    def _fits_in_grace(self) -> bool:
        assert self._current is not None and self._task_started is not None
        remaining = self.expected_duration(self._current) - (self.clock() - self._task_started)
        return remaining <= self.signal_grace_s * 0.8

    # ------------------------------------------------------------------ the loop

    def run(self) -> WorkerSummary:
        """The worker's whole life; returns what it did and why it stopped."""
        self.store.register_worker(self.identity.id, self.identity.host, self.identity.pid, self.clock(),
                                   gpu=self.identity.gpu, slurm=self.identity.slurm)
        try:
            self.summary.stop_reason = self._loop()
        finally:
            self._stopped = True  # any later stop signal is noted and ignored (see catch_stop_signals)
            try:
                self.store.stop_worker(self.identity.id, self.clock())
            except Exception as err:
                log.warning("could not mark worker stopped: %s", err)
        return self.summary

    def _loop(self) -> str:
        while True:
            if self._signal is not None or self._finish_then_stop:
                return f"stopped by {signal.Signals(self._signal).name}" if self._signal else "stopped"
            if self.max_tasks is not None and self._tasks_run() >= self.max_tasks:
                return f"ran --max-tasks {self.max_tasks}"
            self._maybe_reap()
            self.prepare()  # e.g. a resident server that died starts again before the next claim
            task = self.store.claim(self.identity.id, self.clock())
            if task is None:
                waiting = self.store.waiting_work()
                if waiting:
                    log.debug("%d rows wait on running dependencies; polling", waiting)
                    self.store.worker_heartbeat(self.identity.id, self.clock())
                    self.sleep(self.poll_s)
                    continue
                return "nothing left to claim"
            if self.deadline is not None:
                left = self.deadline - self.clock()
                if self.expected_duration(task) > left:
                    self.store.release(task, f"expected {self.expected_duration(task):.0f} s > {left:.0f} s left",
                                       self.clock())
                    self.summary.released += 1
                    return f"only {left:.0f} s left in the job, not enough for another task"
            if self.check is not None and not self.check(task):
                self.store.release(task, "worker settings differ from the plan", self.clock())
                raise ConfigMismatch(
                    f"task {task.id}: this worker's configs would not reproduce the planned config "
                    f"{task.config_hash}: run the worker with the --config-dir the sweep was planned with"
                )
            self._run_one(task)

    def _count_failure(self, task: ClaimedTask, err: Exception) -> None:
        """Trip the breaker when `circuit_breaker` different rows in a row failed alike: a full disk,
        missing weights or a lost GPU would otherwise fail every row of the sweep within minutes."""
        signature = error_signature(err)
        if self._failures and self._failures[-1][0] != signature:
            self._failures.clear()
        self._failures.append((signature, task.id, f"{type(err).__name__}: {err}"))
        rows = sorted({row for _, row, _ in self._failures})
        if self.circuit_breaker and len(rows) >= self.circuit_breaker:
            raise CircuitOpen(
                f"circuit breaker: {len(rows)} rows in a row (#{', #'.join(map(str, rows))}) failed alike, last with "
                f"{self._failures[-1][2].splitlines()[0]}: the fault looks like this node's (full disk, missing "
                "weights, a GPU gone), so this worker stops claiming rather than fail the sweep; fix it and run "
                "the worker again (tasks.circuit_breaker sets how many)"
            )

    def _tasks_run(self) -> int:
        s = self.summary
        return s.done + s.diverged + s.errors + s.fenced

    def _maybe_reap(self) -> None:
        now = self.clock()
        if now - self._last_reap < self.reap_every_s:
            return
        self._last_reap = now
        try:
            report = self.reap(now)
            if report.released or report.failed:
                log.info("reaped stale rows: %s released, %s failed", report.released, report.failed)
        except Exception as err:
            log.warning("reap failed: %s", err)

    def _run_one(self, task: ClaimedTask) -> None:
        log.info("task %s: %s %s (attempt %d/%d)", task.id, task.kind, task.video, task.attempt, task.max_attempts)
        started = self.clock()
        with Heartbeat(self.store, task, self.identity.id, self.heartbeat_interval_s, self.clock):
            try:
                self._current, self._task_started = task, started
                try:
                    outcome = self.execute(task)
                finally:
                    self._current = self._task_started = None
            except Interrupted as why:
                self.store.release(task, str(why), self.clock())
                self.summary.released += 1
                log.info("task %s: released (%s)", task.id, why)
                return
            except Exception as err:
                status = self.store.fail(task, f"{type(err).__name__}: {err}", traceback.format_exc(), self.clock())
                self.summary.errors += 1
                log.error("task %s failed: %s: %s (now %s)", task.id, type(err).__name__, err, status)
                self._count_failure(task, err)
                return
        self._failures.clear()
        won = self.store.finish(task, outcome, self.clock())
        self.settle(outcome, won)
        if won:
            self.summary.durations_s.append(self.clock() - started)
            if outcome.status == "diverged":
                self.summary.diverged += 1
            else:
                self.summary.done += 1
        else:
            self.summary.fenced += 1
