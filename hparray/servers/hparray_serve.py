"""hparray_serve: the server side of hparray's resident-runner protocol, in one file.

Standard library only, Python >= 3.8, and nothing of hparray needs to be installed where it runs:
the hparray worker that starts your server puts this file's folder on PYTHONPATH, so
`import hparray_serve` works in any interpreter (`hparray servers` prints the folder, to run a
server by hand). Wrapping a model is about 20 lines:

    import hparray_serve as hs

    MODEL = {}

    def load():                                  # once per worker: the slow part
        MODEL["net"] = build_my_model()

    def baseline(task):                          # generate from the conditioning frames
        video = MODEL["net"].generate(task.read_condition_array(), task.num_frames, seed=task.seed)
        task.write_output(video)                 # (num_frames, H, W, 3), conditioning frames included

    def finetune_and_generate(task):
        started = time.time()
        MODEL["net"].finetune(task.read_condition_array(), lr=task.lr, steps=task.finetune_steps)
        tuned = time.time()
        task.write_output(MODEL["net"].generate(task.read_condition_array(), task.num_frames, seed=task.seed))
        MODEL["net"].restore()                   # the next task starts from the base weights
        return hs.Reply(finetune_s=tuned - started)

    hs.serve("my-model:" + CHECKPOINT, load=load, baseline=baseline,
             finetune_and_generate=finetune_and_generate)

The protocol (version 1; docs/resident.md): JSON lines on stdin (requests) and stdout (replies).
`serve` says hello at once (protocol version and the model identity, which enters hparray's
config hash), loads, says ready, then answers one reply per task; everything your code prints goes
to stderr (the worker's log), because stdout carries only protocol lines.
"""

from __future__ import annotations

import ast
import json
import os
import struct
import sys
import time
import traceback
from typing import Any, Callable, Optional

PROTOCOL = 1
HELLO_ONLY = "HPARRAY_HELLO_ONLY"


class Video:
    """A (frames, height, width, 3) array as raw bytes, for servers without numpy: float32 values
    in [0, 1] or uint8. `read_npy`/`write_npy` use the .npy format, so numpy reads it as is."""

    def __init__(self, shape: tuple[int, ...], dtype: str, data: bytes) -> None:
        self.shape, self.dtype, self.data = tuple(shape), dtype, data
        if dtype not in ("float32", "uint8"):
            raise ValueError("a Video holds float32 or uint8 values, not " + dtype)
        expected = 1
        for size in self.shape:
            expected *= size
        if len(data) != expected * self.itemsize:
            raise ValueError(f"{len(data)} bytes do not make a {self.shape} {dtype} array")

    @property
    def itemsize(self) -> int:
        return 4 if self.dtype == "float32" else 1

    def frame(self, index: int) -> bytes:
        """The raw bytes of one frame."""
        size = len(self.data) // self.shape[0]
        return self.data[index * size:(index + 1) * size]

    def frames(self) -> list[bytes]:
        return [self.frame(i) for i in range(self.shape[0])]

    @classmethod
    def from_frames(cls, frames: list[bytes], height: int, width: int, dtype: str) -> Video:
        return cls((len(frames), height, width, 3), dtype, b"".join(frames))


_DESCR = {"float32": "<f4", "uint8": "|u1"}


def read_npy(path: str) -> Video:
    """A C-ordered float32 or uint8 .npy file (what hparray writes), without numpy."""
    with open(path, "rb") as fh:
        if fh.read(6) != b"\x93NUMPY":
            raise ValueError(path + " is not an .npy file")
        major = fh.read(2)[0]
        length = struct.unpack("<H" if major == 1 else "<I", fh.read(2 if major == 1 else 4))[0]
        header = ast.literal_eval(fh.read(length).decode("latin1"))
        if header.get("fortran_order"):
            raise ValueError(path + ": Fortran-ordered arrays are not supported")
        dtype = {value: key for key, value in _DESCR.items()}.get(header["descr"])
        if dtype is None:
            raise ValueError(path + ": dtype " + str(header["descr"]) + " is neither float32 nor uint8")
        return Video(tuple(header["shape"]), dtype, fh.read())


def write_npy(path: str, video: Video) -> None:
    """Write a Video as .npy (version 1.0), readable by numpy.load."""
    shape = "(" + ", ".join(str(s) for s in video.shape) + ("," if len(video.shape) == 1 else "") + ")"
    header = "{'descr': '" + _DESCR[video.dtype] + "', 'fortran_order': False, 'shape': " + shape + ", }"
    header += " " * ((64 - (10 + len(header) + 1) % 64) % 64) + "\n"
    with open(path, "wb") as fh:
        fh.write(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode("latin1"))
        fh.write(video.data)


class Task:
    """One request: the row's geometry, hyperparameters, seed and files.

    `condition_video` holds exactly the first `condition_frames` frames of the video at the sweep's
    geometry (float32 in [0, 1]); the full video is never sent. Write the whole predicted video,
    `num_frames` frames with the conditioning frames included, to `output`.
    """

    def __init__(self, request: dict[str, Any]) -> None:
        self.request = request
        self.id = request.get("id")
        self.kind = str(request["kind"])
        self.video = str(request.get("video", ""))
        self.condition_video = str(request["condition_video"])
        self.condition_frames = int(request["condition_frames"])
        self.caption = request.get("caption")
        self.height, self.width = int(request["height"]), int(request["width"])
        self.num_frames, self.fps = int(request["num_frames"]), float(request["fps"])
        self.lr = request.get("lr")
        self.finetune_steps = int(request.get("finetune_steps") or 0)
        self.seed = int(request["seed"])
        self.output = str(request["output"])

    def read_condition(self) -> Video:
        """The conditioning frames as a Video (no numpy needed)."""
        return read_npy(self.condition_video)

    def read_condition_array(self) -> Any:
        """The conditioning frames as a numpy float32 array (condition_frames, H, W, 3)."""
        import numpy as np

        return np.load(self.condition_video)

    def write_output(self, video: Any) -> None:
        """Save the predicted video: a numpy array (uint8, or float in [0, 1]) or a Video."""
        if isinstance(video, Video):
            write_npy(self.output, video)
            return
        import numpy as np

        np.save(self.output, np.asarray(video))


class Reply:
    """What a task function may return: timings (seconds), peak GPU memory (MB), free-form notes,
    and whether the fine-tuning diverged (then no output is needed). Returning None is fine: the
    call's wall time is reported as inference."""

    def __init__(self, finetune_s: float = 0.0, inference_s: float | None = None, peak_memory_mb: float = 0.0,
                 diverged: bool = False, notes: dict[str, Any] | None = None) -> None:
        self.finetune_s, self.inference_s = float(finetune_s), inference_s
        self.peak_memory_mb, self.diverged, self.notes = float(peak_memory_mb), bool(diverged), dict(notes or {})


TaskFunction = Callable[[Task], Optional[Reply]]  # typing's: the helper runs on Python 3.8


def _protocol_streams() -> tuple[Any, Any]:
    """stdin for requests; a private copy of stdout for replies, while fd 1 itself (Python's and C's
    prints, a library's progress bar) is pointed at stderr, where the worker logs it."""
    replies = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return sys.stdin, replies


def _send(out: Any, message: dict[str, Any]) -> None:
    out.write(json.dumps(message, default=str) + "\n")
    out.flush()


def serve(identity: str, baseline: TaskFunction, finetune_and_generate: TaskFunction,
          load: Callable[[], None] | None = None) -> None:
    """Run the server loop until the worker says shutdown or closes stdin."""
    requests, replies = _protocol_streams()
    _send(replies, {"hparray": "hello", "protocol": PROTOCOL, "model": str(identity), "pid": os.getpid(),
                    "python": sys.version.split()[0]})
    if os.environ.get(HELLO_ONLY) == "1":
        return
    started = time.time()
    if load is not None:
        load()
    _send(replies, {"hparray": "ready", "load_s": round(time.time() - started, 3)})
    for line in requests:
        if not line.strip():
            continue
        try:
            request = json.loads(line)
        except ValueError:
            _send(replies, {"hparray": "error", "id": None, "error": "not a JSON line: " + line[:200]})
            continue
        if request.get("hparray") == "shutdown":
            return
        _send(replies, _answer(request, baseline, finetune_and_generate))


def _answer(request: dict[str, Any], baseline: TaskFunction, finetune_and_generate: TaskFunction) -> dict[str, Any]:
    task_id = request.get("id")
    if request.get("hparray") != "task":
        return {"hparray": "error", "id": task_id, "error": "unknown message " + repr(request.get("hparray"))}
    try:
        task = Task(request)
        function = finetune_and_generate if task.kind == "finetune" else baseline
        started = time.time()
        reply = function(task) or Reply()
        wall = time.time() - started
    except Exception as err:  # the worker records it as this attempt's error and keeps the server
        return {"hparray": "error", "id": task_id, "error": f"{type(err).__name__}: {err}",
                "traceback": traceback.format_exc()}
    inference = reply.inference_s if reply.inference_s is not None else max(0.0, wall - reply.finetune_s)
    return {"hparray": "result", "id": task_id, "timings_s": {"finetune": reply.finetune_s, "inference": inference},
            "peak_memory_mb": reply.peak_memory_mb, "diverged": reply.diverged, "notes": reply.notes}
