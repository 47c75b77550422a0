"""The `resident` runner: the user's model as a long-lived server in its own environment.

`runner.command` is the server's argv (any interpreter, no shell). The worker starts it once,
before its first claim, and keeps it for every row; they talk JSON lines on the server's stdin
and stdout (protocol version 1, docs/resident.md; the server side is `hparray_serve.py`):

    server: {"hparray": "hello", "protocol": 1, "model": "<identity>"}   at once
    server: {"hparray": "ready", "load_s": ...}                          once the model is loaded
    worker: {"hparray": "task", ...}  ->  server: {"hparray": "result" | "error", ...}  per row
    worker: {"hparray": "shutdown"}

A request carries the conditioning frames only (an .npy the worker writes), never the path of
the video. The server runs under `guard.py`, so it dies with its worker however the worker ends.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np

from hparray.errors import ConfigError, RunnerError, RunnerSetupError, WorkerStopped
from hparray.runners.command import check_executable
from hparray.runners.protocol import Clip, Generation, Hyperparams

PROTOCOL = 1
SERVERS_DIR = Path(__file__).resolve().parents[1] / "servers"
"""hparray_serve.py and the shipped example servers; put on the server's PYTHONPATH."""
GUARD = Path(__file__).resolve().parent / "guard.py"
PLACEHOLDERS = {"servers": str(SERVERS_DIR), "python": sys.executable}
HELLO_TIMEOUT_S = 120.0
STDERR_TAIL_LINES = 30
_STOP_WAIT_S = 10.0


_IDENTITIES: dict[tuple[str, ...], str] = {}  # hello-only answers, once per argv and process


class ServerGone(RunnerError):
    """The server exited, timed out or broke the protocol; a fresh one starts before the next claim."""


def expand(command: list[str] | tuple[str, ...]) -> list[str]:
    """The server's argv with `{servers}` (the folder of shipped servers) and `{python}` (this
    hparray's interpreter) filled in; config hashes keep the argv as written."""
    if not command or not all(isinstance(arg, str) for arg in command):
        raise ConfigError("runner.command must be the server's argv as a non-empty list of strings, "
                          'e.g. ["/envs/mymodel/bin/python", "serve.py", "--ckpt", "/ckpt"]')
    try:
        return [arg.format(**PLACEHOLDERS) for arg in command]
    except (KeyError, IndexError, ValueError) as exc:
        raise ConfigError(f"runner.command {list(command)}: {exc}: the resident runner knows only "
                          "{servers} and {python} (write {{ and }} for literal braces)") from None


class _Lines:
    """Protocol lines from the server's stdout, with a deadline; stderr copied to ours with a tail kept."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None and proc.stderr is not None
        self.proc, self.buffer = proc, b""
        self.selector = selectors.DefaultSelector()
        self.selector.register(proc.stdout, selectors.EVENT_READ)
        self.tail: deque[str] = deque(maxlen=STDERR_TAIL_LINES)
        self.copier = threading.Thread(target=self._copy_stderr, args=(proc.stderr,), daemon=True)
        self.copier.start()

    def _copy_stderr(self, stream: Any) -> None:
        for raw in iter(stream.readline, b""):
            line = raw.decode(errors="replace").rstrip("\n")
            self.tail.append(line)
            print(f"[server] {line}", file=sys.stderr, flush=True)

    def stderr_tail(self) -> str:
        self.copier.join(timeout=1.0)  # what the server said last, if it is exiting
        return "\n".join(self.tail) or "(nothing)"

    def read(self, timeout_s: float) -> dict[str, Any] | None:
        """The next protocol message; None on timeout; ServerGone at EOF or on a non-protocol line."""
        deadline = time.monotonic() + timeout_s
        stdout = self.proc.stdout
        assert stdout is not None
        while b"\n" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            if self.selector.select(timeout=left):
                chunk = os.read(stdout.fileno(), 65536)
                if not chunk:
                    code = self.proc.wait()
                    raise ServerGone(f"the server exited (code {code}); last lines of its stderr:\n"
                                     f"{self.stderr_tail()}")
                self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        text = line.decode(errors="replace").strip()
        try:
            message = json.loads(text)
        except ValueError:
            message = None
        if not isinstance(message, dict) or "hparray" not in message:
            raise ServerGone(f"the server wrote {text[:200]!r} on stdout, which is not a protocol message: "
                             "print to stderr, not stdout (hparray_serve does this for you)")
        return message


class ResidentRunner:
    """Keeps one server per worker; restarts it before the next row when it dies or times out."""

    def __init__(self, runner: dict[str, Any], model: dict[str, Any], device: str) -> None:
        self.command = list(runner.get("command") or ())
        self.argv = expand(self.command)
        self.timeout_s = float(runner.get("timeout_s", 3600))
        self.start_timeout_s = float(runner.get("start_timeout_s", 1800))
        self.device = device
        self.fps = float(model.get("frame_rate") or 25)
        self.proc: subprocess.Popen[bytes] | None = None
        self.lines: _Lines | None = None
        self.hello: dict[str, Any] | None = None
        self._identity: str | None = None
        self._unreported_load_s = 0.0
        self._next_id = 0

    # ----------------------------------------------------------------- what it runs

    def check(self) -> None:
        """The server's executable exists and can run; its hello (a short start) names the model."""
        check_executable(self.argv[0], "runner.command[0]")
        self.identity()

    def identity(self) -> str:
        """The model the server says it runs (its hello), learnt by starting it with
        HPARRAY_HELLO_ONLY=1, which says hello and exits before loading anything."""
        if self._identity is None:
            key = tuple(self.argv)
            if key not in _IDENTITIES:
                _IDENTITIES[key] = self._hello_only()
            self._identity = _IDENTITIES[key]
        return self._identity

    def describe(self) -> str:
        return f"runner resident, server {self.argv[0]} (model {self.identity()})"

    def _hello_only(self) -> str:
        env = {**self._environment(), "HPARRAY_HELLO_ONLY": "1"}
        try:
            done = subprocess.run(self.argv, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                                  timeout=HELLO_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise RunnerSetupError(f"the server {self.argv[0]} said no hello within {HELLO_TIMEOUT_S:.0f} s "
                                   "(HPARRAY_HELLO_ONLY=1): it must say hello before loading its model") from None
        except OSError as exc:
            raise RunnerSetupError(f"cannot start the server {self.argv[0]}: {exc.strerror}") from None
        first = (done.stdout.decode(errors="replace").splitlines() or [""])[0]
        try:
            return self._check_hello(json.loads(first))
        except (ValueError, ServerGone) as exc:
            tail = done.stderr.decode(errors="replace").strip().splitlines()[-5:]
            raise RunnerSetupError(f"the server {self.argv[0]} did not say hello ({exc}); it exited {done.returncode}"
                                   f"; last lines of its stderr: {' | '.join(tail) or '(nothing)'}") from None

    @staticmethod
    def _check_hello(message: Any) -> str:
        if not (isinstance(message, dict) and message.get("hparray") == "hello"):
            raise ServerGone(f"its first line was {str(message)[:200]!r}, not a hello")
        if message.get("protocol") != PROTOCOL:
            raise ServerGone(f"it speaks protocol {message.get('protocol')!r}, this hparray speaks {PROTOCOL}")
        if not isinstance(message.get("model"), str) or not message["model"]:
            raise ServerGone("its hello names no model (a non-empty string)")
        return str(message["model"])

    # ----------------------------------------------------------------- lifecycle

    def _environment(self) -> dict[str, str]:
        path = os.pathsep.join(p for p in (str(SERVERS_DIR), os.environ.get("PYTHONPATH", "")) if p)
        return {**os.environ, "PYTHONPATH": path, "HPARRAY_DEVICE": self.device}

    def load(self) -> None:
        """Start the server (once; again after it died) and wait for its hello and ready."""
        if self.proc is not None and self.proc.poll() is None:
            return
        started = time.perf_counter()
        try:
            self.proc = subprocess.Popen([sys.executable, "-I", str(GUARD), *self.argv], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=self._environment(),
                                         start_new_session=True)
        except OSError as exc:
            raise WorkerStopped(f"cannot start the server {self.argv[0]}: {exc.strerror}") from None
        self.lines = _Lines(self.proc)
        try:
            hello = self.lines.read(HELLO_TIMEOUT_S)
            if hello is None:
                raise ServerGone(f"it said no hello within {HELLO_TIMEOUT_S:.0f} s")
            model = self._check_hello(hello)
            if self._identity is not None and model != self._identity:
                raise ServerGone(f"it now says it runs {model!r}, not {self._identity!r}: its checkpoint changed "
                                 "under a running sweep")
            ready = self.lines.read(self.start_timeout_s)
            if ready is None:
                raise ServerGone(f"it did not load within runner.start_timeout_s = {self.start_timeout_s:.0f} s")
            if ready.get("hparray") != "ready":
                raise ServerGone(f"it said {str(ready)[:200]!r} instead of ready")
        except ServerGone as exc:
            tail = self.lines.stderr_tail() if self.lines else ""
            self.stop()
            raise WorkerStopped(f"the server {self.argv[0]} could not start: {exc}; last lines of its stderr:\n"
                                f"{tail}") from None
        self.hello, self._identity = hello, model
        self._unreported_load_s = time.perf_counter() - started

    def stop(self) -> None:
        """Ask the server to shut down; kill it (and its group, through the guard) if it does not."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(OSError, ValueError):
            assert proc.stdin is not None
            proc.stdin.write(b'{"hparray": "shutdown"}\n')
            proc.stdin.close()
        try:
            proc.wait(timeout=_STOP_WAIT_S)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGTERM)  # the guard kills the server's group
            try:
                proc.wait(timeout=_STOP_WAIT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def _kill(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=_STOP_WAIT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    # ----------------------------------------------------------------- tasks

    def baseline(self, clip: Clip, condition_frames: int, seed: int) -> Generation:
        return self._task(clip, "baseline", condition_frames, None, 0, seed)

    def finetune_and_generate(self, clip: Clip, hp: Hyperparams, seed: int) -> Generation:
        return self._task(clip, "finetune", hp.condition_frames, hp.lr, hp.finetune_steps, seed)

    def _task(self, clip: Clip, kind: str, condition_frames: int, lr: float | None, steps: int,
              seed: int) -> Generation:
        self.load()
        assert self.proc is not None and self.proc.stdin is not None and self.lines is not None
        folder = Path(tempfile.mkdtemp(prefix="hparray-resident-"))
        try:
            np.save(folder / "condition.npy", np.ascontiguousarray(clip.frames, dtype=np.float32))
            _, height, width, _ = clip.frames.shape
            self._next_id += 1
            request = {"hparray": "task", "id": self._next_id, "kind": kind, "video": clip.ref.name,
                       "condition_video": str(folder / "condition.npy"), "condition_frames": condition_frames,
                       "caption": clip.ref.caption, "height": height, "width": width, "num_frames": clip.num_frames,
                       "fps": self.fps, "lr": lr, "finetune_steps": steps, "seed": seed,
                       "output": str(folder / "generated.npy")}
            try:
                self.proc.stdin.write((json.dumps(request) + "\n").encode())
                self.proc.stdin.flush()
                reply = self.lines.read(self.timeout_s)
            except BaseException as exc:  # a stop signal (Interrupted), a broken pipe, the server gone
                self._kill()
                if isinstance(exc, BrokenPipeError):
                    raise ServerGone(f"the server died before this row; last lines of its stderr:\n"
                                     f"{self.lines.stderr_tail()}") from None
                raise
            if reply is None:
                tail = self.lines.stderr_tail()
                self._kill()
                raise ServerGone(f"the server took longer than runner.timeout_s = {self.timeout_s:.0f} s on video "
                                 f"{clip.ref.name} and was killed; last lines of its stderr:\n{tail}")
            return self._generation(reply, folder / "generated.npy", clip)
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def _generation(self, reply: dict[str, Any], output: Path, clip: Clip) -> Generation:
        if reply.get("id") != self._next_id or reply.get("hparray") not in ("result", "error"):
            self._kill()
            raise ServerGone(f"the server answered {str(reply)[:200]!r} to request {self._next_id}")
        if reply["hparray"] == "error":
            raise RunnerError(f"the server failed on video {clip.ref.name}: {reply.get('error')}\n"
                              f"{reply.get('traceback') or ''}".rstrip())
        timings = reply.get("timings_s") or {}
        load_s, self._unreported_load_s = self._unreported_load_s, 0.0
        generation = Generation(frames=None, diverged=bool(reply.get("diverged")), notes=dict(reply.get("notes") or {}),
                                peak_memory_mb=float(reply.get("peak_memory_mb") or 0.0),
                                timings_s={"load": load_s, "finetune": float(timings.get("finetune", 0.0)),
                                           "inference": float(timings.get("inference", 0.0))})
        if generation.diverged:
            return generation
        frames = self._read_output(output, clip)
        if not np.all(np.isfinite(frames)):
            generation.diverged, generation.notes["diverged_in"] = True, "output"
            return generation
        generation.frames = frames
        return generation

    @staticmethod
    def _read_output(output: Path, clip: Clip) -> np.ndarray:
        if not output.is_file():
            raise RunnerError(f"the server replied for video {clip.ref.name} but wrote no {output.name}")
        try:
            video = np.load(output, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise RunnerError(f"cannot read the server's {output.name}: {exc}") from None
        _, height, width, _ = clip.frames.shape
        if video.shape != (clip.num_frames, height, width, 3):
            raise RunnerError(f"the server wrote frames of shape {video.shape} for video {clip.ref.name}, "
                              f"expected {(clip.num_frames, height, width, 3)}: the whole video, conditioning "
                              "frames included")
        if video.dtype == np.uint8:
            return video.astype(np.float32) / 255.0
        if not np.issubdtype(video.dtype, np.floating):
            raise RunnerError(f"the server wrote {video.dtype} frames: write uint8 or floats in [0, 1]")
        video = video.astype(np.float32)
        return np.clip(video, 0.0, 1.0) if np.all(np.isfinite(video)) else video
