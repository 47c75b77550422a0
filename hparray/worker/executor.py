"""The local executor: N `hparray worker` processes on this machine until the sweep is done.

The embedded default, with no Slurm: each worker gets its own GPU where there are GPUs, a
worker that dies is replaced while work remains, and Ctrl-C stops every worker cleanly (each
puts its row back). Progress is read from the database, the one source of truth.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from hparray.environment import visible_gpus
from hparray.store import Store, TaskCounts

log = logging.getLogger(__name__)

POLL_S = 0.5
# Exit codes of a worker that must not be replaced: 2, bad input (its configs differ from the
# plan); 3, WorkerStopped (the circuit breaker tripped).
NO_RESPAWN = (2, 3)
STOP_WAIT_S = 30.0


@dataclass
class ExecutorReport:
    started: int = 0
    replaced: int = 0
    exit_codes: list[int] = field(default_factory=list)
    interrupted: bool = False
    gave_up: str = ""


def last_error_line(log_path: Path) -> str:
    """The line of a worker's log that says why it died: its last `error:` line, else its last line."""
    try:
        with log_path.open("rb") as fh:
            fh.seek(max(0, log_path.stat().st_size - 64 * 1024))
            lines = [line.strip() for line in fh.read().decode(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "(no log)"
    errors = [line for line in lines if line.startswith("error:") or " ERROR " in line]
    return (errors or lines or ["(empty log)"])[-1].removeprefix("error: ")


class LocalExecutor:
    """Keeps `workers` worker processes alive until no work is left or the user stops it."""

    def __init__(self, store: Store, worker_args: list[str], workers: int, *, grace_s: float,
                 log_dir: Path, progress: Callable[[], None] | None = None,
                 max_deaths_without_progress: int | None = None):
        self.store = store
        self.worker_args = worker_args
        self.workers = workers
        self.grace_s = grace_s
        self.log_dir = log_dir
        self.progress = progress or (lambda: None)
        # A crash loop is deaths with no finished row in between; a killer (preemption, OOM of one
        # node, chaos tests) can take many workers while the sweep still moves forward.
        self.max_deaths_without_progress = (max_deaths_without_progress if max_deaths_without_progress is not None
                                            else 2 * workers + 2)
        self._deaths_without_progress = 0
        self._finished_at_last_death = -1
        self.gpus = visible_gpus()
        self.report = ExecutorReport()
        self._procs: dict[int, subprocess.Popen[bytes]] = {}
        self._slot_of: dict[int, int] = {}
        self._worker_of: dict[int, str] = {}

    def _spawn(self, slot: int) -> None:
        env = dict(os.environ)
        if self.gpus:
            env["CUDA_VISIBLE_DEVICES"] = self.gpus[slot % len(self.gpus)]
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_file = open(self.log_dir / f"worker-{slot}.log", "ab")  # noqa: SIM115 - handed to the child
        worker_id = f"{os.uname().nodename.split('.')[0]}-local{slot}-{self.report.started}-{os.getpid()}"
        proc = subprocess.Popen([sys.executable, "-m", "hparray", *self.worker_args, "--worker-id", worker_id],
                                env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
        log_file.close()
        self._procs[proc.pid] = proc
        self._slot_of[proc.pid] = slot
        self._worker_of[proc.pid] = worker_id
        self.report.started += 1

    def _work_left(self) -> bool:
        """Rows a new worker could run now or once their dependency is done. Rows running under
        other workers are theirs: waiting for them here would only spawn idle workers."""
        return self.store.task_counts().runnable > 0

    def run(self) -> ExecutorReport:
        """Start the workers and supervise them; returns when they are all gone."""
        previous = signal.signal(signal.SIGINT, self._interrupt)
        previous_term = signal.signal(signal.SIGTERM, self._interrupt)
        try:
            for slot in range(self.workers):
                self._spawn(slot)
            last_reap = 0.0
            while self._procs:
                time.sleep(POLL_S)
                self.progress()
                if time.time() - last_reap > min(self.grace_s / 2, 30.0):
                    self.store.reap(time.time(), self.grace_s)
                    last_reap = time.time()
                for pid, proc in list(self._procs.items()):
                    code = proc.poll()
                    if code is None:
                        continue
                    slot = self._slot_of.pop(pid)
                    worker_id = self._worker_of.pop(pid)
                    del self._procs[pid]
                    self.report.exit_codes.append(code)
                    if code != 0:  # its row, if any, need not wait out the heartbeat grace
                        self.store.reap(time.time(), self.grace_s, gone_workers=[worker_id])
                    if code in NO_RESPAWN and not self.report.interrupted:
                        # It stopped on purpose (configs that differ from the plan, a tripped circuit
                        # breaker): another worker here would stop the same way. Say why, once.
                        log_path = self.log_dir / f"worker-{slot}.log"
                        if not self.report.gave_up:
                            self.report.gave_up = f"a worker stopped: {last_error_line(log_path)} (see {log_path})"
                        continue
                    if code != 0 and not self.report.interrupted and self._work_left():
                        finished = self.store.task_counts().finished
                        if finished == self._finished_at_last_death:
                            self._deaths_without_progress += 1
                        else:
                            self._deaths_without_progress = 1
                            self._finished_at_last_death = finished
                        if self._deaths_without_progress > self.max_deaths_without_progress:
                            log_path = self.log_dir / f"worker-{slot}.log"
                            self.report.gave_up = (f"workers died {self._deaths_without_progress} times in a row "
                                                   f"without finishing a row; the last said: "
                                                   f"{last_error_line(log_path)} (see {log_path})")
                            continue
                        log.warning("worker in slot %d exited with %s; replacing it", slot, code)
                        self.report.replaced += 1
                        self._spawn(slot)
                # Rows can turn pending after the last worker left (a stale row reaped by the
                # periodic pass above): one worker is enough to pick them up.
                if not self._procs and not self.report.interrupted and not self.report.gave_up \
                        and self._work_left():
                    self._spawn(0)
            self.progress()
        except KeyboardInterrupt:
            self._stop_all()
        finally:
            signal.signal(signal.SIGINT, previous)
            signal.signal(signal.SIGTERM, previous_term)
        return self.report

    def _interrupt(self, _signum: int, _frame: object) -> None:
        if not self.report.interrupted:
            self.report.interrupted = True
            raise KeyboardInterrupt

    def _stop_all(self) -> None:
        """SIGTERM every worker (each releases its row), then wait; SIGKILL stragglers."""
        for proc in self._procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.time() + STOP_WAIT_S
        for proc in self._procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                proc.kill()
            self.report.exit_codes.append(proc.returncode if proc.returncode is not None else -9)
        self._procs.clear()


def run_local(store: Store, worker_args: list[str], workers: int, *, grace_s: float, log_dir: Path,
              progress: Callable[[int, int, TaskCounts], None]) -> ExecutorReport:
    """`submit --local`: run the workers until the rows are done, calling `progress(done, total,
    counts)` as they go; rows planned meanwhile join the total (done plus what is left)."""
    before = store.task_counts()

    def refresh() -> None:
        now = store.task_counts()
        done = now.finished - before.finished
        progress(done, done + now.to_run, now)

    return LocalExecutor(store, worker_args, workers, grace_s=grace_s, log_dir=log_dir, progress=refresh).run()
