"""Video sources, readers and sampling: everything that turns `data.source` into frames.

A sweep plans hundreds of tasks from the video list, so the list must be stable (a video's
name is its task key and artifact path) and every video must be checked before anything is
submitted: a short or unreadable file should fail the plan, not a GPU job hours later.
"""

from __future__ import annotations

import csv
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
from PIL import Image
from skimage.transform import resize

from hparray.demo.sample_videos import build_sample_set
from hparray.errors import ConfigError, VideoError
from hparray.rounding import largest_remainder

VIDEO_SUFFIXES = (".mp4", ".webm", ".avi", ".mov", ".mkv")
ARRAY_SUFFIXES = (".npy",)
FRAME_SUFFIXES = (".png", ".jpg", ".jpeg")
# Containers whose stored frame count we trust; the others (Matroska/WebM) rarely store one.
_COUNTED_CONTAINERS = (".mp4", ".mov", ".avi")
SAMPLE_SOURCE = "sample"
SAMPLE_VERSION = "sample-v1"
_FORMATS = "use .mp4, .webm, .avi, .mov, .mkv, .npy or a folder of .png/.jpg frames"
_MAX_LISTED = 5


@dataclass(frozen=True)
class VideoRef:
    """One video of a sweep; `name` is the task key and the artifact folder, so it is derived
    only from the video's place in its source and never changes between plans."""

    name: str
    path: str
    category: str
    caption: str | None = None


def list_videos(source: str, *, config_dir: Path, cache_dir: Path | None = None) -> list[VideoRef]:
    """The videos of `data.source`, sorted by name.

    `source` is 'sample' (the bundled procedural set), a directory (category = first-level
    subfolder, files directly inside get 'default') or a CSV manifest with columns path,
    category and optional caption (relative paths resolved against the CSV's folder). A
    relative source is looked up in the current directory, then the project folder (the
    parent of `config_dir`), then `config_dir` itself.
    """
    if source == SAMPLE_SOURCE:
        return _from_manifest(sample_dir(cache_dir) / "manifest.csv")
    path = _resolve_source(source, config_dir)
    if path.suffix.lower() == ".csv" and path.is_file():
        return _from_manifest(path)
    if not path.is_dir():
        raise VideoError(
            f"data.source {path} is neither a directory nor a .csv manifest: point it at a "
            "folder of videos, a manifest with columns path,category[,caption], or 'sample'"
        )
    refs = _from_directory(path)
    if not refs:
        raise VideoError(f"data.source {path} contains no videos: add videos ({_FORMATS}) to it")
    return _unique_sorted(refs, path)


def count_frames(path: str) -> int:
    """Frame count without decoding where possible, so that plan-time checks of a whole
    dataset stay cheap: container metadata, image files in a folder, or an .npy header."""
    p = Path(path)
    if not p.exists():
        raise VideoError(f"video {path} does not exist: restore it or drop it from the source")
    if p.is_dir():
        count = len(_frame_files(p))
        if count == 0:
            raise VideoError(
                f"frame folder {path} holds no .png/.jpg frames: add frames or drop it"
            )
        return count
    suffix = p.suffix.lower()
    if suffix in ARRAY_SUFFIXES:
        return int(_load_npy(p).shape[0])
    if suffix not in VIDEO_SUFFIXES:
        raise VideoError(f"video {path} has an unsupported format: {_FORMATS}")
    try:
        with av.open(str(p)) as container:
            if not container.streams.video:
                raise VideoError(f"file {path} holds no video stream: drop it from the source")
            stream = container.streams.video[0]
            if suffix in _COUNTED_CONTAINERS and stream.frames > 0:
                return int(stream.frames)
            return sum(1 for _ in container.decode(stream))
    except (av.FFmpegError, OSError, ValueError) as exc:
        raise VideoError(
            f"video {path} cannot be decoded ({exc}): re-encode it or drop it"
        ) from exc


def read_video(path: str, num_frames: int, height: int, width: int) -> np.ndarray:
    """The first `num_frames` frames as (T, height, width, 3) float32 in [0, 1].

    Frames are resized (anti-aliased, bilinear) so that the short side covers the target and
    then centre-cropped, so every runner sees the same pixels whatever the source resolution.
    """
    p = Path(path)
    if not p.exists():
        raise VideoError(f"video {path} does not exist: restore it or drop it from the source")
    if p.is_dir():
        frames = _read_frame_folder(p, num_frames)
    elif p.suffix.lower() in ARRAY_SUFFIXES:
        frames = _read_npy(p, num_frames)
    elif p.suffix.lower() in VIDEO_SUFFIXES:
        frames = _read_container(p, num_frames)
    else:
        raise VideoError(f"video {path} has an unsupported format: {_FORMATS}")
    if len(frames) < num_frames:
        raise VideoError(
            f"video {path} has {len(frames)} frames but {num_frames} are needed: drop it from "
            "the source or lower data.num_frames"
        )
    return np.stack([_fit(_to_rgb01(frame, path), height, width) for frame in frames])


def check_videos(videos: list[VideoRef], num_frames: int) -> None:
    """Check every selected video before planning and report all problems at once, so that a
    dataset is fixed in one pass rather than one failed submission per bad file."""
    problems: list[str] = []
    for ref in videos:
        try:
            count = count_frames(ref.path)
        except VideoError as exc:
            problems.append(f"{ref.name}: {exc}")
            continue
        if count < num_frames:
            problems.append(f"{ref.name}: {ref.path} has {count} frames, fewer than {num_frames}")
    if problems:
        listed = "; ".join(problems[:_MAX_LISTED])
        more = f" (and {len(problems) - _MAX_LISTED} more)" if len(problems) > _MAX_LISTED else ""
        raise VideoError(
            f"{len(problems)} of {len(videos)} videos cannot be used with data.num_frames="
            f"{num_frames}: {listed}{more}; fix or drop them, or lower data.num_frames"
        )


def stratified_sample(
    videos: list[VideoRef], n: int, seed: int, by: str = "category"
) -> list[VideoRef]:
    """A deterministic stratified sample of `n` videos, sorted by name.

    Categories get seats by largest remainder in proportion to their size, at least one each
    while n allows; the members are drawn with numpy's PCG64 over name-sorted groups, so the
    same seed and list give the same videos on every machine.
    """
    if by != "category":
        raise ConfigError(f"data.stratify_by {by!r} is not supported: videos only have 'category'")
    if n < 1:
        raise ConfigError(f"data.num_videos must be at least 1, got {n}")
    ordered = sorted(videos, key=lambda ref: ref.name)
    if n >= len(ordered):
        return ordered
    groups: dict[str, list[VideoRef]] = {}
    for ref in ordered:
        groups.setdefault(ref.category, []).append(ref)
    names = sorted(groups)
    rng = np.random.default_rng(seed)
    seats = _allocate([len(groups[c]) for c in names], n, rng)
    picked: list[VideoRef] = []
    for category, k in zip(names, seats):
        group = groups[category]
        picked.extend(group[i] for i in rng.choice(len(group), size=k, replace=False))
    return sorted(picked, key=lambda ref: ref.name)


def sample_dir(cache_dir: Path | None = None) -> Path:
    """The bundled sample set, generated on first use.

    It lives under `cache_dir`, else $HPARRAY_CACHE, else ~/.cache/hparray. It is built in a
    temporary folder next to its final place and renamed into it, so a reader never sees a
    half-written set and concurrent first uses (e.g. array tasks) cannot corrupt it.
    """
    root = Path(cache_dir or os.environ.get("HPARRAY_CACHE") or Path.home() / ".cache" / "hparray")
    final = root.expanduser().absolute() / SAMPLE_VERSION
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=f".{SAMPLE_VERSION}.", dir=final.parent))
    try:
        build_sample_set(building)
        _publish(building, final)
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return final


def _publish(built: Path, final: Path) -> None:
    """Move a finished folder into place atomically; if another process got there first, its
    copy wins (both are identical) and `built` is left for the caller to remove."""
    try:
        os.rename(built, final)
    except OSError:
        if not final.is_dir():
            raise


# Listing sources ---------------------------------------------------------------------------


def _resolve_source(source: str, config_dir: Path) -> Path:
    """An absolute source as given; a relative one from the cwd, else from the project folder
    (the parent of configs/, where output_dir is resolved too), else from the config folder."""
    path = Path(source).expanduser()
    if path.is_absolute():
        candidates = [path]
    else:
        candidates = [Path.cwd() / path, Path(config_dir).parent / path, Path(config_dir) / path]
    for candidate in candidates:
        if candidate.exists():
            return Path(os.path.normpath(candidate))
    tried = " or ".join(str(c) for c in candidates)
    raise VideoError(
        f"data.source {source!r} does not exist (looked for {tried}): fix the path or use 'sample'"
    )


def _from_directory(root: Path) -> list[VideoRef]:
    """Videos under a folder: first-level subfolders are categories, loose files are 'default';
    a folder that holds image files is one video (a frame folder), not a category."""
    refs: list[VideoRef] = []
    for entry in sorted(root.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir() and not _frame_files(entry):
            refs.extend(_ref(video, root, entry.name) for video in _walk(entry))
        elif _is_video(entry):
            refs.append(_ref(entry, root, "default"))
    return refs


def _walk(folder: Path) -> list[Path]:
    """Video files and frame folders anywhere under `folder`, hidden entries skipped."""
    found: list[Path] = []
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir() and not _frame_files(entry):
            found.extend(_walk(entry))
        elif _is_video(entry):
            found.append(entry)
    return found


def _is_video(path: Path) -> bool:
    """A readable video: a frame folder, or a file with a supported suffix."""
    if path.is_dir():
        return bool(_frame_files(path))
    return path.suffix.lower() in VIDEO_SUFFIXES + ARRAY_SUFFIXES


def _from_manifest(manifest: Path) -> list[VideoRef]:
    """Videos listed in a CSV manifest; every row is checked and all bad rows reported."""
    manifest = Path(os.path.abspath(manifest))
    try:
        with open(manifest, newline="", encoding="utf-8-sig") as f:
            table = [row for row in csv.reader(f) if any(cell.strip() for cell in row)]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise VideoError(f"manifest {manifest} cannot be read ({exc}): fix the file") from exc
    header = [cell.strip().lower() for cell in table[0]] if table else []
    rows = [dict(zip(header, (cell.strip() for cell in row))) for row in table[1:]]
    missing = [c for c in ("path", "category") if c not in header]
    if missing:
        raise VideoError(
            f"manifest {manifest} lacks the column(s) {', '.join(missing)} (found "
            f"{', '.join(header) or 'none'}): add a header row path,category[,caption]"
        )
    base = manifest.parent
    refs: list[VideoRef] = []
    problems: list[str] = []
    for line, row in enumerate(rows, start=2):
        if not row.get("path") or not row.get("category"):
            problems.append(f"line {line} has an empty path or category")
            continue
        path = Path(os.path.normpath(base / Path(row["path"]).expanduser()))
        if not path.exists():
            problems.append(f"line {line}: {path} does not exist")
        elif not _is_video(path):
            problems.append(f"line {line}: {path} is not a video ({_FORMATS})")
        else:
            refs.append(_ref(path, base, row["category"], row.get("caption") or None))
    if problems:
        listed = "; ".join(problems[:_MAX_LISTED])
        more = f" (and {len(problems) - _MAX_LISTED} more)" if len(problems) > _MAX_LISTED else ""
        raise VideoError(
            f"manifest {manifest} has {len(problems)} bad row(s): {listed}{more}; "
            "fix or remove them"
        )
    if not refs:
        raise VideoError(f"manifest {manifest} lists no videos: add rows path,category[,caption]")
    return _unique_sorted(refs, manifest)


def _ref(path: Path, root: Path, category: str, caption: str | None = None) -> VideoRef:
    """A VideoRef named after the path relative to `root` (the anchor-less absolute path for a
    manifest row outside its folder), without the file extension and with '/' as '__'."""
    parts = path.relative_to(root).parts if path.is_relative_to(root) else path.parts[1:]
    if path.is_file():
        parts = (*parts[:-1], Path(parts[-1]).stem)
    name = re.sub(r"[^A-Za-z0-9._-]", "_", "__".join(parts))
    return VideoRef(name=name, path=str(path), category=category, caption=caption)


def _unique_sorted(refs: list[VideoRef], source: Path) -> list[VideoRef]:
    """Sort by name and refuse two videos with one name: names key tasks and artifacts."""
    refs = sorted(refs, key=lambda ref: ref.name)
    for a, b in zip(refs, refs[1:]):
        if a.name == b.name:
            raise VideoError(
                f"{a.path} and {b.path} in {source} both get the video name {a.name!r}: "
                "rename one of them"
            )
    return refs


# Reading frames ----------------------------------------------------------------------------


def _frame_files(folder: Path) -> list[Path]:
    """Image files directly in `folder`, in natural order (frame2 before frame10)."""
    try:
        files = [p for p in folder.iterdir() if p.suffix.lower() in FRAME_SUFFIXES and p.is_file()]
    except OSError:
        return []
    return sorted(
        files, key=lambda p: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name)]
    )


def _read_frame_folder(folder: Path, num_frames: int) -> list[np.ndarray]:
    """The first `num_frames` images of a frame folder (all of them if there are fewer)."""
    frames: list[np.ndarray] = []
    for file in _frame_files(folder)[:num_frames]:
        try:
            with Image.open(file) as image:
                frames.append(_pil_array(image))
        except OSError as exc:
            raise VideoError(f"frame {file} cannot be read ({exc}): replace or remove it") from exc
        if frames[-1].shape[:2] != frames[0].shape[:2]:
            raise VideoError(
                f"frame {file} is {frames[-1].shape[1]}x{frames[-1].shape[0]} but the first "
                f"frame of {folder} is {frames[0].shape[1]}x{frames[0].shape[0]}: "
                "make all frames one size"
            )
    return frames


def _pil_array(image: Image.Image) -> np.ndarray:
    """Pixels as an array that _to_rgb01 understands (uint8 or uint16, 1 to 4 channels)."""
    if image.mode in ("L", "LA", "RGB", "RGBA"):
        return np.asarray(image)
    if image.mode.startswith("I;16"):
        return np.asarray(image).astype(np.uint16)
    return np.asarray(image.convert("RGBA" if "A" in image.getbands() else "RGB"))


def _load_npy(path: Path) -> np.ndarray:
    """An .npy memory-mapped, so that counting frames does not read the whole array."""
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise VideoError(f"array {path} cannot be loaded ({exc}): save it with numpy.save") from exc
    if array.ndim not in (3, 4) or (array.ndim == 4 and array.shape[3] not in (1, 2, 3, 4)):
        raise VideoError(
            f"array {path} has shape {array.shape}: save videos as (T, H, W, 3) or (T, H, W)"
        )
    return array


def _read_npy(path: Path, num_frames: int) -> list[np.ndarray]:
    """The first `num_frames` frames of an .npy video."""
    return list(np.asarray(_load_npy(path)[:num_frames]))


def _read_container(path: Path, num_frames: int) -> list[np.ndarray]:
    """Decode the first `num_frames` frames of a video file (all of them if there are fewer)."""
    frames: list[np.ndarray] = []
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoError(f"file {path} holds no video stream: drop it from the source")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for frame in container.decode(stream):
                frames.append(frame.to_ndarray(format="rgb24"))
                if len(frames) == num_frames:
                    break
    except (av.FFmpegError, OSError, ValueError) as exc:
        raise VideoError(
            f"video {path} cannot be decoded ({exc}): re-encode it or drop it"
        ) from exc
    return frames


def _to_rgb01(frame: np.ndarray, path: str) -> np.ndarray:
    """One frame as (H, W, 3) float32 in [0, 1]: gray is repeated, alpha dropped, integers
    scaled by their type's range; float input must already be in [0, 1]."""
    if frame.dtype == np.uint8:
        rgb = frame.astype(np.float32) / 255.0
    elif frame.dtype == np.uint16:
        rgb = frame.astype(np.float32) / 65535.0
    elif frame.dtype == np.bool_:
        rgb = frame.astype(np.float32)
    elif np.issubdtype(frame.dtype, np.floating):
        rgb = frame.astype(np.float32)
        if not np.isfinite(rgb).all() or rgb.min() < -1e-3 or rgb.max() > 1 + 1e-3:
            raise VideoError(
                f"video {path} holds float values outside [0, 1] (min {rgb.min():.3g}, max "
                f"{rgb.max():.3g}): rescale it to [0, 1] or save it as uint8"
            )
        rgb = np.clip(rgb, 0.0, 1.0)
    else:
        raise VideoError(
            f"video {path} has pixel type {frame.dtype}: use uint8, uint16 or float in [0, 1]"
        )
    if rgb.ndim == 2:
        rgb = rgb[..., None]
    if rgb.shape[2] in (1, 2):  # gray or gray + alpha
        return np.repeat(rgb[..., :1], 3, axis=2)
    return rgb[..., :3]


def _fit(frame: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize so that the short side covers height x width (anti-aliased), then centre-crop."""
    h, w = frame.shape[:2]
    if (h, w) != (height, width):
        scale = max(height / h, width / w)
        shape = (max(height, round(h * scale)), max(width, round(w * scale)), 3)
        frame = resize(frame, shape, order=1, anti_aliasing=scale < 1, preserve_range=True)
        top = (frame.shape[0] - height) // 2
        left = (frame.shape[1] - width) // 2
        frame = frame[top : top + height, left : left + width]
    return np.ascontiguousarray(frame, dtype=np.float32)


# Sampling ----------------------------------------------------------------------------------


def _allocate(sizes: list[int], n: int, rng: np.random.Generator) -> list[int]:
    """Seats per group for n < sum(sizes): largest remainder of the proportional quotas, at
    least one per group while n covers every group; ties go by a seeded random order."""
    tiebreak = [int(i) for i in rng.permutation(len(sizes))]
    if n < len(sizes):  # fewer seats than groups: one each for the largest quotas
        return largest_remainder(sizes, n, low=[0] * len(sizes), high=[1] * len(sizes), order=tiebreak)
    return largest_remainder(sizes, n, low=[1] * len(sizes), high=sizes, order=tiebreak)
