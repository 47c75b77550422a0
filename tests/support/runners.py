"""Runners for tests of the orchestration: cheap, deterministic, and controllable from the
environment of the worker process (tests start real `hparray worker` processes).

HPARRAY_TEST_TASK_S   seconds each task sleeps (so a test can signal a worker mid-task)
HPARRAY_TEST_FAIL     a video name whose tasks raise (retries, then failed), or `disk-full`: every task
                      raises the same OSError (a node-wide fault)
HPARRAY_TEST_FAIL_NOTE text appended to that error's message (quotes, `;`, `$(...)`: what notify: must pass on)
HPARRAY_TEST_DIVERGE  a video name whose fine-tune rows diverge (no frames, as a NaN loss would end them)
HPARRAY_TEST_MARK_DIR a folder where each task start leaves a file (to see what ran, and how often)
HPARRAY_TEST_SHADE    a factor on the predicted frames (to tell two workers' outputs apart)
HPARRAY_TEST_HOLD     a folder: each task waits until `go` exists there, or it can take one `ticket-*`
                      file in it; so a test can signal or kill a worker that is certainly mid-task
                      (no guess of how long a task takes), and let N tasks through with N tickets
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from hparray import failpoints
from hparray.runners import Clip, Generation, Hyperparams


class SleepyRunner:
    """Predicts the last conditioning frame, darkened by the learning rate, after a sleep."""

    def __init__(self, runner: dict, model: dict, device: str):
        self.loaded = 0

    def load(self) -> None:
        self.loaded += 1

    def _work(self, clip: Clip, condition_frames: int, lr: float, kind: str) -> Generation:
        mark_dir = os.environ.get("HPARRAY_TEST_MARK_DIR")
        if mark_dir:
            Path(mark_dir, f"{kind}-{clip.ref.name}-{lr:g}-{condition_frames}-{os.getpid()}-{time.time_ns()}").touch()
        if os.environ.get("HPARRAY_TEST_FAIL") == clip.ref.name:
            raise RuntimeError(f"test failure for {clip.ref.name}{os.environ.get('HPARRAY_TEST_FAIL_NOTE', '')}")
        if kind == "finetune" and os.environ.get("HPARRAY_TEST_DIVERGE") == clip.ref.name:
            return Generation(frames=None, timings_s={"finetune": 0.0, "inference": 0.0}, diverged=True,
                              notes={"diverged_at_step": 1})
        if os.environ.get("HPARRAY_TEST_FAIL") == "disk-full":  # a node-wide fault: every row fails alike
            raise OSError(28, "No space left on device", f"/scratch/{clip.ref.name}-{time.time_ns()}.npz")
        time.sleep(float(os.environ.get("HPARRAY_TEST_TASK_S", "0")))
        failpoints.hold("HPARRAY_TEST_HOLD")
        shade = float(os.environ.get("HPARRAY_TEST_SHADE", "1"))
        last = clip.frames[condition_frames - 1] * (1.0 - min(lr * 1000.0, 0.5)) * shade
        rest = np.broadcast_to(last, (clip.num_frames - condition_frames, *last.shape))
        frames = np.concatenate([clip.frames, rest])
        return Generation(frames=frames, timings_s={"finetune": 0.0, "inference": 0.0}, peak_memory_mb=1.0)

    def baseline(self, clip: Clip, condition_frames: int, seed: int) -> Generation:
        return self._work(clip, condition_frames, 0.0, "baseline")

    def finetune_and_generate(self, clip: Clip, hp: Hyperparams, seed: int) -> Generation:
        return self._work(clip, hp.condition_frames, hp.lr, "finetune")


class BrokenLoadRunner(SleepyRunner):
    """A model that cannot load on this node (as when a GPU is gone): every worker dies at start."""

    def load(self) -> None:
        raise RuntimeError("CUDA error: no CUDA-capable device is detected on gpu-node-7")


class SlowLoadRunner(SleepyRunner):
    """A model that takes as long to load as the test says: load() leaves `loading` in
    HPARRAY_TEST_MARK_DIR, then holds like a task (HPARRAY_TEST_HOLD), so a test can signal a
    worker that is certainly still starting up."""

    def load(self) -> None:
        marks = os.environ.get("HPARRAY_TEST_MARK_DIR")
        if marks:
            Path(marks, "loading").touch()
        failpoints.hold("HPARRAY_TEST_HOLD")
        super().load()
