"""What a row leaves on disk besides its scores (`artifacts:` in base.yaml), written by the attempt
into a folder of its own and published by the attempt that wins its row.

lossless (default)  frames.mkv: the generated frames as uint8 RGB in FFV1 (lossless, exact on
                    read), about 6x smaller than float32 and 15x faster to write; generated.mp4
preview             generated.mp4 only (H.264, to watch)
full                frames.npz: float32, as generated, compressed; generated.mp4
none                nothing

Metrics are always computed on the float frames in memory, before any of this. Recomputing them
from frames.mkv differs only by uint8 rounding, at most 1/510 per value: a frame's RMSE moves by
at most 1/510, so its PSNR by at most 20*log10(1 + 1/(510*RMSE)) dB (docs/benchmarks.md has the
measured differences).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

import numpy as np

KINDS = ("lossless", "preview", "full", "none")
LOSSLESS_NAME, FULL_NAME, PREVIEW_NAME = "frames.mkv", "frames.npz", "generated.mp4"
ROUNDING = 0.5 / 255.0
"""The largest difference uint8 storage makes to a value in [0, 1]."""


def to_uint8(frames: np.ndarray) -> np.ndarray:
    """Float frames in [0, 1] rounded to uint8, as every artifact stores them."""
    return (np.clip(frames, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def staging_dir(target: Path, lease: str) -> Path:
    """The attempt-private folder next to `target`: hidden, and named by the attempt's lease."""
    return target.parent / f".{target.name}.{lease[:12]}.partial"


def stage_artifacts(frames: np.ndarray, target: Path, fps: int, lease: str, kind: str = "lossless") -> Path | None:
    """The artifacts of `kind` in this attempt's own folder (None for `none`); on any error (a full
    disk) the folder is removed, so nothing half-written is left behind."""
    if kind == "none":
        return None
    staged = staging_dir(target, lease)
    try:
        staged.mkdir(parents=True, exist_ok=True)
        if kind == "lossless":
            write_ffv1(staged / LOSSLESS_NAME, frames, fps)
        elif kind == "full":
            np.savez_compressed(staged / FULL_NAME, frames=frames.astype(np.float32))
        write_mp4(staged / PREVIEW_NAME, frames, fps)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    return staged


def publish_artifacts(staged: Path, target: Path, links: list[Path]) -> None:
    """Rename the winning attempt's folder into place (whatever an older sweep left there goes);
    the other searches holding the same config get a relative symlink to it."""
    if target.is_symlink() or target.is_file():
        target.unlink()
    elif target.exists():
        shutil.rmtree(target)
    os.replace(staged, target)
    for other in links:
        other.parent.mkdir(parents=True, exist_ok=True)
        if not other.exists() and not other.is_symlink():
            with contextlib.suppress(FileExistsError):  # another search's link, made a moment ago
                other.symlink_to(os.path.relpath(target, other.parent), target_is_directory=True)


def read_frames(folder: Path) -> np.ndarray | None:
    """The generated frames of a row's artifact folder as float32 in [0, 1] (frames.npz exactly,
    frames.mkv to uint8 rounding, the mp4 preview lossily), or None when it kept none."""
    if (folder / FULL_NAME).is_file():
        with np.load(folder / FULL_NAME) as data:
            return np.asarray(data["frames"], dtype=np.float32)
    for name in (LOSSLESS_NAME, PREVIEW_NAME):
        if (folder / name).is_file():
            return decode(folder / name).astype(np.float32) / 255.0
    return None


def decode(path: Path) -> np.ndarray:
    """Every frame of a video file as (T, H, W, 3) uint8 RGB."""
    import av

    with av.open(str(path)) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


def write_ffv1(path: Path, frames: np.ndarray, fps: int) -> None:
    """Lossless uint8 RGB in FFV1/Matroska: decoding gives back `to_uint8(frames)` exactly."""
    _encode(path, to_uint8(frames), fps, "matroska", "ffv1", "bgr0", {})


def write_mp4(path: Path, frames: np.ndarray, fps: int) -> None:
    """An H.264 (or MPEG-4 where x264 is missing) video of float frames in [0, 1], to watch."""
    import av

    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    _encode(path, to_uint8(frames), fps, "mp4", codec, "yuv420p", {"crf": "18"} if codec == "libx264" else {})


def _encode(path: Path, data: np.ndarray, fps: int, container_format: str, codec: str, pix_fmt: str,
            options: dict[str, object]) -> None:
    import av

    with av.open(str(path), mode="w", format=container_format) as container:
        stream = container.add_stream(codec, rate=fps)
        assert isinstance(stream, av.VideoStream)
        stream.width, stream.height = data.shape[2], data.shape[1]
        stream.pix_fmt = pix_fmt
        if options:
            stream.options = options
        for frame in data:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
