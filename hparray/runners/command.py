"""The `command` runner: a user's own per-video script, one process per task.

The script gets its inputs as argv placeholders and hands back the whole predicted video as a
file, so any model in any environment can be swept; hparray still scores the frames itself.
There is no shell anywhere: each argv element is formatted on its own and passed as a list,
so video paths with spaces, quotes or `;` reach the script intact and cannot inject commands.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import string
import subprocess
import tempfile
import time
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np

from hparray.errors import ConfigError, RunnerError, RunnerSetupError
from hparray.runners.protocol import Clip, Generation, Hyperparams

# {condition_video}: an .npy of exactly the first condition_frames frames (float32 in [0, 1], at the
# sweep's geometry): the honest input. {video} hands the script the whole video, the frames it is
# scored on included; it stays for scripts that must read the source themselves.
PLACEHOLDERS = ("video", "condition_video", "output_dir", "lr", "condition_frames", "finetune_steps", "seed",
                "caption", "height", "width", "num_frames")

OUTPUT_NAMES = ("generated.npy", "generated.mp4")
TIMINGS_NAME = "timings.json"

STDERR_TAIL_LINES = 20
_KILL_GRACE_S = 5.0  # between SIGTERM and SIGKILL, so a script can flush before it dies
_POLL_S = 0.05

_SAMPLE_VALUES: dict[str, Any] = {
    "video": "/videos/a b.mp4",
    "condition_video": "/tmp/in/condition.npy",
    "caption": "a dog runs",
    "height": 64,
    "width": 64,
    "num_frames": 49,
    "output_dir": "/tmp/out",
    "lr": 1e-4,
    "condition_frames": 17,
    "finetune_steps": 10,
    "seed": 0,
}


def _check_command(command: Any) -> list[str]:
    """`runner.command` as a list of argv templates, or a ConfigError saying what is wrong."""
    if not isinstance(command, (list, tuple)) or not command or not all(isinstance(a, str) for a in command):
        raise ConfigError(
            "runner.command must be a non-empty list of strings (one per argv element, no shell), "
            'e.g. ["python", "predict.py", "--video", "{video}", "--out", "{output_dir}"]'
        )
    known = ", ".join("{" + name + "}" for name in PLACEHOLDERS)
    for arg in command:
        try:
            fields = [
                field for _, field, _, _ in string.Formatter().parse(arg) if field is not None
            ]
        except ValueError as exc:
            raise ConfigError(
                f"runner.command element {arg!r}: {exc} (write {{{{ and }}}} for literal braces)"
            ) from None
        for field in fields:
            if field not in PLACEHOLDERS:
                raise ConfigError(
                    f"runner.command element {arg!r} uses unknown placeholder {{{field}}}: "
                    f"known placeholders are {known} (write {{{{ and }}}} for literal braces)"
                )
        try:
            arg.format(**_SAMPLE_VALUES)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"runner.command element {arg!r}: {exc}") from None
    return list(command)


def check_executable(program: str, where: str) -> str:
    """The path `program` runs from, or a RunnerSetupError that says why it would not start.

    An interpreter named by a script's `#!` line is checked too: a script whose interpreter is
    missing fails just the same, hours later on a compute node.
    """
    if "{" in program:
        return program  # a placeholder: only known per task
    found = shutil.which(program) if os.sep not in program else program
    if found is None or not os.path.exists(found):
        raise RunnerSetupError(
            f"{where} {program!r} is not found ({'no such file' if os.sep in program else 'not on PATH'}): "
            "install it, or give its full path"
        )
    if os.path.isdir(found) or not os.access(found, os.X_OK):
        raise RunnerSetupError(
            f"{where} {found} is not an executable file: `chmod +x` it, or run it through its "
            "interpreter, e.g. [python, script.py, ...]"
        )
    try:
        with open(found, "rb") as fh:
            first = fh.readline(256)
    except OSError as exc:
        raise RunnerSetupError(f"{where} {found} cannot be read ({exc.strerror}): check its permissions") from None
    if first.startswith(b"#!"):
        words = first[2:].decode(errors="replace").split()
        if not words:
            raise RunnerSetupError(f"{where} {found} has an empty #! line: name its interpreter there")
        interpreter = words[0]
        if os.path.basename(interpreter) == "env":  # #!/usr/bin/env [-S] [VAR=value] python3
            interpreter = next((w for w in words[1:] if not w.startswith("-") and "=" not in w), interpreter)
        check_executable(interpreter, f"the #! interpreter of {found},")
    return found


def _tail(path: Path, lines: int = STDERR_TAIL_LINES) -> str:
    with path.open("r", encoding="utf-8", errors="replace") as fh:
        return "".join(deque(fh, maxlen=lines)).rstrip()


def _kill_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _read_mp4(path: Path) -> np.ndarray:
    import av

    with av.open(str(path)) as container:
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    if not frames:
        raise RunnerError(f"{path} holds no video frames")
    return np.stack(frames)


def _to_unit_float(video: np.ndarray, source: Path) -> np.ndarray:
    """uint8 or float in [0, 1] -> float32 in [0, 1]; anything else is the script's bug."""
    if video.dtype == np.uint8:
        return video.astype(np.float32) / 255.0
    if not np.issubdtype(video.dtype, np.floating):
        raise RunnerError(f"{source} has dtype {video.dtype}: write uint8 or floats in [0, 1]")
    video = video.astype(np.float32)
    finite = video[np.isfinite(video)]
    if finite.size and (finite.min() < -1e-3 or finite.max() > 1 + 1e-3):
        raise RunnerError(
            f"{source} has values in [{finite.min():.3g}, {finite.max():.3g}]: "
            "write floats in [0, 1] (or uint8)"
        )
    return np.clip(video, 0.0, 1.0)


class CommandRunner:
    """The `command` runner: runs `runner.command` once per task with its placeholders filled in."""

    def __init__(self, runner: dict[str, Any], model: dict[str, Any], device: str) -> None:
        self.command = _check_command(runner.get("command"))
        timeout = runner.get("timeout_s", 3600)
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
            raise ConfigError(f"runner.timeout_s is {timeout!r}: use a positive number of seconds")
        self.timeout_s = float(timeout)
        self.device = device
        self.clock = time.monotonic  # the per-task timeout's clock (tests drive it)

    def check(self) -> None:
        """The executable exists and can run (checked, not run: a script may take minutes)."""
        check_executable(self.command[0], "runner.command[0]")

    def load(self) -> None:
        """Nothing to load: the script loads its own model in every task."""

    def baseline(self, clip: Clip, condition_frames: int, seed: int) -> Generation:
        """Run the script with lr and finetune_steps set to 0."""
        return self._run(clip, lr=0, condition_frames=condition_frames, finetune_steps=0, seed=seed)

    def finetune_and_generate(self, clip: Clip, hp: Hyperparams, seed: int) -> Generation:
        """Run the script with this task's hyperparameters."""
        return self._run(
            clip,
            lr=hp.lr,
            condition_frames=hp.condition_frames,
            finetune_steps=hp.finetune_steps,
            seed=seed,
        )

    def argv(self, values: dict[str, Any]) -> list[str]:
        """The argv for one task: each element formatted on its own, never through a shell."""
        return [arg.format(**values) for arg in self.command]

    def _run(self, clip: Clip, **hyper: Any) -> Generation:
        output_dir = Path(tempfile.mkdtemp(prefix="hparray-task-"))
        log_dir = Path(tempfile.mkdtemp(prefix="hparray-log-"))
        try:
            condition = log_dir / "condition.npy"
            np.save(condition, np.asarray(clip.frames, dtype=np.float32))
            _, height, width, _ = clip.frames.shape
            argv = self.argv({"video": str(clip.ref.path), "condition_video": str(condition),
                              "output_dir": str(output_dir), "caption": clip.ref.caption or "", "height": height,
                              "width": width, "num_frames": clip.num_frames, **hyper})
            started = time.perf_counter()
            returncode, peak_rss_mb = self._execute(argv, log_dir / "stderr")
            wall_s = time.perf_counter() - started
            if returncode != 0:
                how = (
                    f"was killed by signal {signal.Signals(-returncode).name}"
                    if returncode < 0
                    else f"exited with code {returncode}"
                )
                raise RunnerError(
                    f"runner command {argv[0]!r} {how} on video {clip.ref.name}; "
                    f"last lines of its stderr:\n{_tail(log_dir / 'stderr')}"
                )
            video = self._read_output(output_dir, clip, log_dir / "stderr")
            timings, peak_mb = self._timings(output_dir, wall_s, peak_rss_mb)
        finally:
            shutil.rmtree(output_dir, ignore_errors=True)
            shutil.rmtree(log_dir, ignore_errors=True)
        if not np.all(np.isfinite(video)):
            return Generation(
                frames=None,
                timings_s=timings,
                peak_memory_mb=peak_mb,
                diverged=True,
                notes={"diverged_in": "output"},
            )
        return Generation(frames=video, timings_s=timings, peak_memory_mb=peak_mb)

    def _execute(self, argv: list[str], stderr_path: Path) -> tuple[int, float]:
        """Run argv in its own process group; returns (exit status, the child's peak RSS in MB).

        The group is killed on timeout and after exit alike, so nothing the script started
        (data loaders, servers) outlives its task and holds the GPU.
        """
        env = {**os.environ, "HPARRAY_DEVICE": self.device}
        with stderr_path.open("wb") as stderr:
            try:
                proc = subprocess.Popen(
                    argv, stdin=subprocess.DEVNULL, stderr=stderr, env=env, start_new_session=True
                )
            except OSError as exc:
                raise RunnerError(f"cannot start runner command {argv[0]!r}: {exc}") from exc
            deadline = self.clock() + self.timeout_s
            try:
                while True:
                    # wait4 rather than Popen.wait: it also returns this child's own peak RSS.
                    pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
                    if pid:
                        proc.returncode = os.waitstatus_to_exitcode(status)
                        return proc.returncode, usage.ru_maxrss / 1024.0
                    if self.clock() > deadline:
                        self._kill(proc)
                        raise RunnerError(
                            f"runner command {argv[0]!r} timed out after {self.timeout_s:g} s "
                            f"(runner.timeout_s) and was killed; last lines of its stderr:\n"
                            f"{_tail(stderr_path)}"
                        )
                    time.sleep(_POLL_S)
            finally:
                _kill_group(proc.pid, signal.SIGKILL)
                if proc.returncode is None:
                    proc.wait()

    @staticmethod
    def _kill(proc: subprocess.Popen[bytes]) -> None:
        _kill_group(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=_KILL_GRACE_S)
        except subprocess.TimeoutExpired:
            _kill_group(proc.pid, signal.SIGKILL)
            proc.wait()

    def _read_output(self, output_dir: Path, clip: Clip, stderr_path: Path) -> np.ndarray:
        for name in OUTPUT_NAMES:
            path = output_dir / name
            if path.is_file():
                break
        else:
            raise RunnerError(
                f"runner command exited with code 0 but wrote neither {' nor '.join(OUTPUT_NAMES)} "
                f"into {{output_dir}} for video {clip.ref.name}; last lines of its stderr:\n"
                f"{_tail(stderr_path)}"
            )
        try:
            raw = np.load(path, allow_pickle=False) if path.suffix == ".npy" else _read_mp4(path)
        except (OSError, ValueError) as exc:
            raise RunnerError(f"cannot read {name} written by the runner command: {exc}") from exc
        num_frames = clip.num_frames
        _, height, width, _ = clip.frames.shape
        if raw.ndim != 4 or raw.shape[-1] != 3:
            raise RunnerError(f"{name} has shape {raw.shape}: write (T, H, W, 3)")
        if raw.shape[1:3] != (height, width):
            raise RunnerError(
                f"{name} has frames of {raw.shape[1]}x{raw.shape[2]}, the video "
                f"{clip.ref.name} has {height}x{width}"
            )
        if raw.shape[0] < num_frames:
            raise RunnerError(
                f"{name} has {raw.shape[0]} frames, the video {clip.ref.name} has {num_frames}: "
                "write the whole video, conditioning frames included"
            )
        return _to_unit_float(raw[:num_frames], path)

    @staticmethod
    def _timings(
        output_dir: Path, wall_s: float, peak_rss_mb: float
    ) -> tuple[dict[str, float], float]:
        """The script's own timings.json when it wrote one, else the wall time as inference."""
        path = output_dir / TIMINGS_NAME
        if not path.is_file():
            return {"load": 0.0, "finetune": 0.0, "inference": wall_s}, peak_rss_mb
        try:
            reported = json.loads(path.read_text())
            if not isinstance(reported, dict):
                raise ValueError("not a JSON object")
            finetune = float(reported.get("finetune_s", 0.0))
            inference = float(reported.get("inference_s", wall_s - finetune))
            peak = float(reported.get("peak_memory_mb", peak_rss_mb))
        except (ValueError, TypeError) as exc:
            raise RunnerError(
                f"{TIMINGS_NAME} written by the runner command is not "
                f'{{"finetune_s": ..., "inference_s": ...}}: {exc}'
            ) from exc
        if not all(math.isfinite(v) and v >= 0 for v in (finetune, inference, peak)):
            raise RunnerError(f"{TIMINGS_NAME} holds negative or non-finite values: {reported}")
        return {"load": 0.0, "finetune": finetune, "inference": inference}, peak
