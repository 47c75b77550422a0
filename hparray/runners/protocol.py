"""The runner protocol: what every task row asks of an experiment implementation.

A runner is loaded once per worker process and then serves many tasks, so that the model
stays resident; it returns the whole predicted video and hparray scores it itself, so the
metrics are the same whichever runner produced the frames.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from hparray.errors import ConfigError

if TYPE_CHECKING:
    from hparray.config import Settings
    from hparray.videos import VideoRef


@dataclass(frozen=True)
class Hyperparams:
    """The three factors a sweep varies."""

    lr: float
    condition_frames: int
    finetune_steps: int


@dataclass(frozen=True)
class Clip:
    """A video as a runner sees it: its reference, its conditioning frames only ((condition_frames,
    H, W, 3) float32 in [0, 1]: the frames a row is scored on are never handed to a runner), and
    how many frames the prediction must have, conditioning frames included."""

    ref: VideoRef
    frames: np.ndarray
    num_frames: int

    @classmethod
    def conditioned(cls, ref: VideoRef, video: np.ndarray, condition_frames: int) -> Clip:
        """The clip of a whole video that a runner may see: its first `condition_frames` frames."""
        return cls(ref, np.ascontiguousarray(video[:condition_frames]), int(video.shape[0]))


@dataclass
class Generation:
    """What a runner returns for one task.

    `frames` is the whole predicted video (conditioning frames included), (T, H, W, 3) float32
    in [0, 1], or None when the run diverged. `timings_s` holds at least `finetune` and
    `inference` seconds; `peak_memory_mb` is CUDA max allocated on a GPU, process RSS on a CPU.
    """

    frames: np.ndarray | None
    timings_s: dict[str, float] = field(default_factory=dict)
    peak_memory_mb: float = 0.0
    diverged: bool = False
    notes: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class MemoryEstimate:
    """GPU memory of a row, estimated before anything runs: the parts (name, GiB), the peak of a
    fine-tune row, of a baseline inference and of prompt encoding, and the overall peak in GiB
    with the CUDA context counted."""

    parts: tuple[tuple[str, float], ...]
    finetune_gib: float
    inference_gib: float
    encoding_gib: float
    peak_gib: float
    baseline_peak_gib: float
    summary: str

    def breakdown(self) -> str:
        """The nonzero parts, one phrase each."""
        return ", ".join(f"{name} {gib:.2f}" for name, gib in self.parts if gib > 0)


@runtime_checkable
class Runner(Protocol):
    """An experiment implementation; constructed with (runner_settings, model_settings, device).

    Construction is cheap and validates the settings; `load` is the slow part. A runner may also
    have, all optional:
    - `check()`: `plan` and `submit` call it to refuse settings that could never run (a missing
      executable or checkpoint) before any GPU time is spent;
    - `identity() -> str | None`: which model the rows run, when the settings alone do not say
      (the built-in weights' digest, a server's model); it enters every config hash;
    - `describe() -> str`: one line for the plan shown before anything runs;
    - a classmethod `geometry_problem(height, width) -> (key, problem, fix) | None`: frame sizes
      this runner cannot take (checked when the configs load, for the built-in runners);
    - `memory_estimate(height, width, num_frames, condition_frames) -> MemoryEstimate | None`: the
      GPU memory of a row, so `plan`, `doctor` and `submit` can say whether it fits;
    - `prepare(videos)`: once after `load`, with the sweep's videos, for work shared by all rows
      of a video (the `ltx` runner encodes each video's prompt there).
    """

    def load(self) -> None:
        """Load the model once per worker process (slow); later calls are no-ops."""

    def baseline(self, clip: Clip, condition_frames: int, seed: int) -> Generation:
        """Generate the continuation with the un-fine-tuned model."""

    def finetune_and_generate(self, clip: Clip, hp: Hyperparams, seed: int) -> Generation:
        """Fine-tune on the first `hp.condition_frames` frames, generate, then restore the base weights."""


BUILTIN_RUNNERS = {
    "ltx": "hparray.runners.ltx:LTXRunner",
    "command": "hparray.runners.command:CommandRunner",
    "resident": "hparray.runners.resident:ResidentRunner",
}


def build_runner(settings: Settings, device: str = "cpu") -> Any:
    """The configured runner, constructed (cheap: nothing loads). Runners get plain dicts of the
    `runner:` and `model:` sections, so a user's runner needs nothing from hparray to read them."""
    return runner_class(settings.runner.name)(settings.runner.model_dump(), settings.model.model_dump(), device)


def check_runner(settings: Settings) -> None:
    """Import the configured runner, build it (which validates its settings) and run its own
    `check()`: everything a worker would find out on its first task, found here instead."""
    runner = build_runner(settings)
    check = getattr(runner, "check", None)
    if callable(check):
        check()


def runner_identity(runner: Any) -> str | None:
    """The runner's model identity (see `Runner`), or None when the settings say it all."""
    identity = getattr(runner, "identity", None)
    return identity() if callable(identity) else None


def memory_estimate(settings: Settings, condition_frames: int) -> MemoryEstimate | None:
    """The runner's estimate of a row's GPU memory at the sweep's geometry, if it makes one."""
    estimate = getattr(build_runner(settings), "memory_estimate", None)
    if not callable(estimate):
        return None
    data = settings.data
    result = estimate(data.height, data.width, data.num_frames, condition_frames)
    return result if isinstance(result, MemoryEstimate) else None


def describe_runner(settings: Settings) -> str:
    """One line naming the runner and the model the rows will run (for `plan` and `doctor`)."""
    describe = getattr(build_runner(settings), "describe", None)
    return describe() if callable(describe) else f"runner {settings.runner.name}"


def geometry_problem(name: str, height: int, width: int) -> tuple[str, str, str] | None:
    """A built-in runner's objection to the frame size (a user's runner states its own in check())."""
    if name not in BUILTIN_RUNNERS:
        return None
    rule = getattr(runner_class(name), "geometry_problem", None)
    return rule(height, width) if callable(rule) else None


def runner_class(name: str) -> type:
    """Resolve `runner.name` (`ltx`, `command` or `package.module:Class`) to a class."""
    target = BUILTIN_RUNNERS.get(name, name)
    if ":" not in target:
        raise ConfigError(
            f"runner.name {name!r} is not a runner: use 'ltx', 'command' or 'package.module:Class'"
        )
    module_name, _, class_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(
            f"runner.name {name!r}: cannot import module {module_name!r} ({exc}); "
            "check the spelling and that the package is installed"
        ) from exc
    try:
        return getattr(module, class_name)
    except AttributeError:
        raise ConfigError(
            f"runner.name {name!r}: module {module_name!r} has no class {class_name!r}"
        ) from None
