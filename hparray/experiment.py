"""One task, start to finish: read the video, ask the runner, score the unseen frames, save frames.

The runner only produces frames; scoring happens here, the same way for every runner, so a
built-in run and a user's script are measured by the same ruler.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hparray.artifacts import publish_artifacts, stage_artifacts
from hparray.config import Settings
from hparray.environment import default_device
from hparray.errors import HparrayError, RunnerError
from hparray.metrics import Scorer, trivial_prediction
from hparray.plan import config_hash, sampled_videos, task_seed
from hparray.runners import Clip, Generation, Hyperparams, Runner
from hparray.runners.protocol import build_runner, runner_identity
from hparray.tasks import ClaimedTask, TaskOutcome
from hparray.videos import VideoRef, read_video

log = logging.getLogger(__name__)


class Experiment:
    """Holds the runner and the scorer for the life of a worker process (the model stays resident)."""

    def __init__(self, settings: Settings, device: str | None = None, runner: Runner | None = None):
        self.settings = settings
        self.device = device or default_device()
        self.runner = runner or build_runner(settings, self.device)
        self.scorer = Scorer(list(settings.metrics), self.device)
        self._load_s = 0.0
        self._prepared = False
        self._videos: OrderedDict[str, np.ndarray] = OrderedDict()
        self._links: dict[str, list[Path]] = {}  # staged folder -> the other folders that link to it

    def load(self) -> None:
        """Load the model (a no-op once loaded; a resident server that died starts again here,
        before the next claim); the time is charged to the next task."""
        started = time.perf_counter()
        self.runner.load()
        if not self._prepared:
            self._prepared = True
            self._prepare()
        self._load_s += time.perf_counter() - started

    def _prepare(self) -> None:
        """Hand the runner the sweep's videos once (the `ltx` runner encodes their prompts)."""
        prepare = getattr(self.runner, "prepare", None)
        if not callable(prepare):
            return
        try:
            videos = sampled_videos(self.settings)
        except HparrayError as err:  # each row then prepares its own video
            log.warning("cannot list the sweep's videos to prepare them up front: %s", err)
            return
        prepare(videos)

    def close(self) -> None:
        """Let go of the model (a resident server is told to shut down)."""
        stop = getattr(self.runner, "stop", None)
        if callable(stop):
            stop()

    def matches_plan(self, task: ClaimedTask) -> bool:
        """Whether this worker's settings would produce what the plan promised for `task`."""
        hp = self.hyperparams(task)
        return config_hash(task.kind, hp, self.settings, runner_identity(self.runner))[0] == task.config_hash

    @staticmethod
    def hyperparams(task: ClaimedTask) -> Hyperparams:
        return Hyperparams(lr=task.lr or 0.0, condition_frames=task.condition_frames,
                           finetune_steps=task.finetune_steps or 0)

    def frames(self, task: ClaimedTask) -> np.ndarray:
        """The video's frames; the last few are kept, since rows are ordered video by video."""
        if task.video_path not in self._videos:
            data = self.settings.data
            self._videos[task.video_path] = read_video(task.video_path, data.num_frames, data.height, data.width)
            while len(self._videos) > 2:
                self._videos.popitem(last=False)
        return self._videos[task.video_path]

    def run(self, task: ClaimedTask, artifact_dirs: list[Path]) -> TaskOutcome:
        """Run `task` start to finish; artifacts go to the first of `artifact_dirs`, the others link to it."""
        return self.score(self.generate(task), artifact_dirs)

    def generate(self, task: ClaimedTask) -> Produced:
        """The GPU's part: the runner's frames for `task` (what the worker waits for)."""
        started = time.perf_counter()
        self.load()
        load_s, self._load_s = self._load_s, 0.0
        truth = self.frames(task)
        cf = task.condition_frames
        clip = Clip.conditioned(VideoRef(task.video, task.video_path, task.category, task.caption), truth, cf)
        seed = task_seed(self.settings.seed, task.video_seed)
        if task.kind == "baseline":
            generation = self.runner.baseline(clip, cf, seed)
        else:
            generation = self.runner.finetune_and_generate(clip, self.hyperparams(task), seed)
        return Produced(task, generation, truth, load_s, started)

    def score(self, produced: Produced, artifact_dirs: list[Path]) -> TaskOutcome:
        """The CPU's part, which may run while the next row generates: scores of the unseen frames,
        frame by frame, and the artifacts, staged for `settle`."""
        task, generation, truth = produced.task, produced.generation, produced.truth
        cf = task.condition_frames
        timings = {"load": produced.load_s, "finetune": generation.timings_s.get("finetune", 0.0),
                   "inference": generation.timings_s.get("inference", 0.0)}
        outcome = TaskOutcome(status="diverged" if generation.diverged else "done", timings_s=timings,
                              peak_memory_mb=generation.peak_memory_mb, details=dict(generation.notes))
        if not generation.diverged:
            if generation.frames is None or generation.frames.shape != truth.shape:
                shape = None if generation.frames is None else generation.frames.shape
                raise RunnerError(f"runner returned frames of shape {shape}, expected {truth.shape}")
            scoring = time.perf_counter()
            frames = self.scorer.score_frames(generation.frames, truth, cf)
            outcome.metrics = {name: float(np.mean(values)) for name, values in frames.items()}
            outcome.per_frame = {"first_frame": cf, **frames}
            if task.kind == "baseline":
                trivial = self.scorer.score_frames(trivial_prediction(truth, cf), truth, cf)
                outcome.trivial_metrics = {name: float(np.mean(values)) for name, values in trivial.items()}
                outcome.per_frame.update({f"trivial_{name}": values for name, values in trivial.items()})
            timings["metrics"] = time.perf_counter() - scoring
            outcome.lpips_weights = self.scorer.lpips_weights
            if artifact_dirs:
                writing = time.perf_counter()
                staged = stage_artifacts(generation.frames, artifact_dirs[0], self.settings.model.frame_rate,
                                         task.lease, self.settings.artifacts)
                timings["artifacts"] = time.perf_counter() - writing
                if staged is not None:
                    outcome.artifact_dir, outcome.staged_dir = str(artifact_dirs[0]), str(staged)
                    self._links[str(staged)] = artifact_dirs[1:]
        timings["wall"] = time.perf_counter() - produced.started
        return outcome

    def settle(self, outcome: TaskOutcome, won: bool) -> None:
        """After the finish: the attempt that won the row publishes its artifacts; a fenced one
        (its row was reaped and run again) drops them, so it never overwrites the winner's."""
        if outcome.staged_dir is None or outcome.artifact_dir is None:
            return
        links = self._links.pop(outcome.staged_dir, [])
        if won:
            publish_artifacts(Path(outcome.staged_dir), Path(outcome.artifact_dir), links)
        else:
            shutil.rmtree(outcome.staged_dir, ignore_errors=True)


@dataclass
class Produced:
    """A row's generated frames, waiting to be scored (`Experiment.score`)."""

    task: ClaimedTask
    generation: Generation
    truth: np.ndarray
    load_s: float
    started: float
