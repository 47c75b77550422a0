"""The worker loop: claim -> run -> record -> claim, until nothing is left it could run.

It never writes SQL (the store does) and never computes metrics (the experiment does). It
heartbeats from a thread whose errors never reach the task, and on SIGTERM, SIGINT or Slurm's
warning (SIGUSR1) it puts its row back without spending an attempt.

With a `complete` step (scoring and artifacts), a row's generation runs in the loop and its
completion in a background stage one row deep, so the GPU starts row N+1 while row N is scored:
row N stays leased and heartbeated until its result is recorded, a worker never holds more than
two rows, and a stop waits for the stage (STAGE_STOP_WAIT_S) or gives row N back.
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
STAGE_STOP_WAIT_S = 20.0
NOTHING_LEFT = "nothing left to claim"
"""The stop reason of a worker that ran out of work (its runtime then asks whether the sweep is complete)."""
"""How long a stopping worker waits for the row in its background stage before giving it back
(Slurm kills 30 s after its SIGTERM by default)."""


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
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
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


Execute = Callable[[ClaimedTask], Any]


class Stage:
    """One background job at a time: a row's completion. An error it raises is kept and raised
    in the loop at the next `wait`, so a tripped circuit breaker still stops the worker."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.task: ClaimedTask | None = None

    def submit(self, task: ClaimedTask, job: Callable[[], None]) -> None:
        self.wait()
        self.task = task

        def run() -> None:
            try:
                job()
            except BaseException as err:  # noqa: BLE001  (handed to the loop)
                self._error = err
            finally:
                self.task = None

        self._thread = threading.Thread(target=run, name=f"stage-{task.id}", daemon=True)
        self._thread.start()

    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def wait(self, timeout_s: float | None = None) -> bool:
        """Wait for the job (at most `timeout_s`); True when none is left running. Raises its error."""
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                return False
            self._thread = None
        error, self._error = self._error, None
        if error is not None:
            raise error
        return True


class Worker:
    """Runs tasks from `store` with `execute` until none is claimable, `max_tasks`, or a signal."""

    def __init__(self, store: Store, execute: Execute, identity: WorkerIdentity, *,
                 heartbeat_interval_s: float, heartbeat_grace_s: float, max_tasks: int | None = None,
                 poll_s: float = 2.0, deadline: float | None = None, signal_grace_s: float = 0.0,
                 expected_duration: Callable[[ClaimedTask], float] | None = None,
                 check: Callable[[ClaimedTask], bool] | None = None,
                 settle: Callable[[TaskOutcome, bool], None] | None = None, circuit_breaker: int = 3,
                 reap: Callable[[float], ReapReport] | None = None, reap_every_s: float | None = None,
                 prepare: Callable[[], None] | None = None, complete: Callable[[Any], TaskOutcome] | None = None,
                 on_failed: Callable[[int], object] | None = None,
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
        self.on_failed = on_failed  # told the id of each row that failed for good here (notify:)
        self.complete = complete
        self.stage = Stage()
        self._lock = threading.Lock()  # the summary and the breaker are updated from the stage too
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
            self._drain()  # raises the last completion's error, if any
        finally:
            self._stopped = True  # any later stop signal is noted and ignored (see catch_stop_signals)
            self._give_back_stage()
            try:
                self.store.stop_worker(self.identity.id, self.clock())
            except Exception as err:
                log.warning("could not mark worker stopped: %s", err)
        return self.summary

    def _loop(self) -> str:
        while True:
            self.stage.wait(0)  # an error of the last completion (a tripped breaker) stops the loop here
            if self._signal is not None or self._finish_then_stop:
                return f"stopped by {signal.Signals(self._signal).name}" if self._signal else "stopped"
            if self.max_tasks is not None and self._tasks_run() >= self.max_tasks:
                return f"ran --max-tasks {self.max_tasks}"
            self._maybe_reap()
            self.prepare()  # e.g. a resident server that died starts again before the next claim
            task = self.store.claim(self.identity.id, self.clock())
            if task is None and self.stage.busy():
                self._drain()  # the row being completed may be what the others wait for
                continue
            if task is None:
                waiting = self.store.waiting_work()
                if waiting:
                    log.debug("%d rows wait on running dependencies; polling", waiting)
                    self.store.worker_heartbeat(self.identity.id, self.clock())
                    self.sleep(self.poll_s)
                    continue
                return NOTHING_LEFT
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
        return s.done + s.diverged + s.errors + s.fenced + (1 if self.stage.busy() else 0)

    def _drain(self) -> None:
        """Wait for the row in the background stage; once a stop signal came, STAGE_STOP_WAIT_S at most."""
        stop_by: float | None = None
        while not self.stage.wait(0.5):
            if self._signal is not None and stop_by is None:
                stop_by = time.monotonic() + STAGE_STOP_WAIT_S
            if stop_by is not None and time.monotonic() > stop_by:
                log.warning("the row in the background stage did not finish within %.0f s of the stop",
                            STAGE_STOP_WAIT_S)
                return

    def _give_back_stage(self) -> None:
        """A row still in the stage when the worker ends (a stop that could not wait, an error in the
        loop) is waited for a little, then given back (its late finish is fenced)."""
        task = self.stage.task
        if task is None or not self.stage.busy():
            return
        try:
            if self.stage.wait(STAGE_STOP_WAIT_S if self._signal is None else 0):
                return
        except Exception as err:
            log.warning("task %s: its completion failed while the worker stopped: %s", task.id, err)
            return
        if self.stage.busy():
            try:
                self.store.release(task, "the worker stopped before the row was scored", self.clock())
                self.summary.released += 1
            except Exception as err:
                log.warning("could not give back task %s: %s", task.id, err)

    def _maybe_reap(self) -> None:
        now = self.clock()
        if now - self._last_reap < self.reap_every_s:
            return
        self._last_reap = now
        try:
            report = self.reap(now)
            if report.released or report.failed:
                log.info("reaped stale rows: %s released, %s failed", report.released, report.failed)
            for task_id in report.failed:
                self._tell_failed(task_id)
        except Exception as err:
            log.warning("reap failed: %s", err)

    def _run_one(self, task: ClaimedTask) -> None:
        log.info("task %s: %s %s (attempt %d/%d)", task.id, task.kind, task.video, task.attempt, task.max_attempts)
        started = self.clock()
        beat = Heartbeat(self.store, task, self.identity.id, self.heartbeat_interval_s, self.clock).__enter__()
        try:
            self._current, self._task_started = task, started
            try:
                produced = self.execute(task)
            finally:
                self._current = self._task_started = None
        except Interrupted as why:
            beat.stop()
            self.store.release(task, str(why), self.clock())
            with self._lock:
                self.summary.released += 1
            log.info("task %s: released (%s)", task.id, why)
            return
        except Exception as err:
            beat.stop()
            self._failed(task, err)
            return
        if self.complete is None:
            self._record(task, produced, beat, started)
        else:
            complete = self.complete
            self.stage.submit(task, lambda: self._complete(task, complete, produced, beat, started))

    def _complete(self, task: ClaimedTask, complete: Callable[[Any], TaskOutcome], produced: Any, beat: Heartbeat,
                  started: float) -> None:
        """The background stage: score and stage artifacts, then record (still heartbeating)."""
        try:
            outcome = complete(produced)
        except Exception as err:
            beat.stop()
            self._failed(task, err)
            return
        self._record(task, outcome, beat, started)

    def _failed(self, task: ClaimedTask, err: Exception) -> None:
        status = self.store.fail(task, f"{type(err).__name__}: {err}", traceback.format_exc(), self.clock())
        if status == "failed":
            self._tell_failed(task.id)
        with self._lock:
            self.summary.errors += 1
            log.error("task %s failed: %s: %s (now %s)", task.id, type(err).__name__, err, status)
            self._count_failure(task, err)

    def _tell_failed(self, task_id: int) -> None:
        """A row failed for good here (its last error, or its last loss to the reaper)."""
        if self.on_failed is None:
            return
        try:
            self.on_failed(task_id)
        except Exception as err:  # a message is never worth a row
            log.warning("task %s: could not tell of its failure: %s", task_id, err)

    def _record(self, task: ClaimedTask, outcome: TaskOutcome, beat: Heartbeat, started: float) -> None:
        try:
            won = self.store.finish(task, outcome, self.clock())
        finally:
            beat.stop()
        self.settle(outcome, won)
        with self._lock:
            self._failures.clear()
            if won:
                self.summary.durations_s.append(self.clock() - started)
                if outcome.status == "diverged":
                    self.summary.diverged += 1
                else:
                    self.summary.done += 1
            else:
                self.summary.fenced += 1
