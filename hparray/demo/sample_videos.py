"""The bundled sample set: procedural videos made from the photographs scikit-image ships.

A sweep needs videos before anyone has data, and tests need videos without the internet. The
motions are smooth and predictable (constant velocity, zoom rate or angular speed, sub-pixel
bilinear sampling) so that a video model can learn to continue them: a sweep on this set
measures something. Everything is derived from fixed seeds, so every machine builds the same
set; the same generator with other seeds gives other videos (e.g. a training set on seeds 1000+).
"""

from __future__ import annotations

import csv
import functools
import math
from pathlib import Path

import numpy as np
from skimage import data as skdata
from skimage.transform import AffineTransform, resize, warp

CATEGORIES: tuple[str, ...] = ("pan", "zoom", "rotate", "objects")
VIDEOS_PER_CATEGORY = 7
NUM_FRAMES = 57
SIZE = 128

# Only photographs that skimage ships inside its wheel: the other skimage.data images are
# downloaded on first use and fail offline. Each maps to the phrase used in captions.
PHOTOS: dict[str, str] = {
    "astronaut": "a portrait of an astronaut",
    "brick": "a brick wall",
    "camera": "a man with a camera",
    "cell": "a cell under a microscope",
    "chelsea": "a tabby cat",
    "clock": "a wall clock",
    "coffee": "a cup of coffee",
    "coins": "old coins",
    "colorwheel": "a color wheel",
    "grass": "grass",
    "gravel": "gravel",
    "hubble_deep_field": "the Hubble deep field",
    "immunohistochemistry": "a stained tissue sample",
    "moon": "the surface of the moon",
    "motorcycle_left": "a motorcycle in a workshop",
    "motorcycle_right": "a motorcycle seen from the right",
    "page": "a page of text",
    "retina": "a retina",
    "rocket": "a rocket on its launch pad",
    "text": "printed text",
}
_PHOTO_NAMES = tuple(PHOTOS)

# Working copies are this many times the frame size on their short side: enough for the
# largest pan base without upsampling, small enough to keep per-video resizes cheap.
_WORK_SCALE = 2.5


def photo_for(category: str, index: int) -> str:
    """The photo of video `index` in `category`: each category walks the photo list from its
    own offset, so the sample set's categories mostly show different photos."""
    offset = CATEGORIES.index(category) * VIDEOS_PER_CATEGORY
    return _PHOTO_NAMES[(offset + index) % len(_PHOTO_NAMES)]


def sample_seed(category: str, index: int) -> int:
    """The seed of a sample-set video: 0..27, fixed so that every machine builds the same set."""
    return CATEGORIES.index(category) * VIDEOS_PER_CATEGORY + index


def generate_video(
    category: str, index: int, seed: int, num_frames: int = NUM_FRAMES, size: int = SIZE
) -> np.ndarray:
    """One procedural video, (T, H, W, 3) uint8; `index` picks the photo, `seed` the motion."""
    return _generate(category, index, seed, num_frames, size)[0]


def build_sample_set(dest: Path) -> list[Path]:
    """Write the whole sample set under `dest` (which must exist): one .npy per video in a
    folder per category, a manifest.csv with captions and a README.txt; returns the .npy paths."""
    written: list[Path] = []
    rows: list[tuple[str, str, str]] = []
    for category in CATEGORIES:
        (dest / category).mkdir(exist_ok=True)
        for index in range(VIDEOS_PER_CATEGORY):
            frames, caption = _generate(
                category, index, sample_seed(category, index), NUM_FRAMES, SIZE
            )
            rel = f"{category}/{category}_{photo_for(category, index)}.npy"
            np.save(dest / rel, frames)
            written.append(dest / rel)
            rows.append((rel, category, caption))
    with open(dest / "manifest.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(("path", "category", "caption"))
        writer.writerows(rows)
    (dest / "README.txt").write_text(
        f"hparray sample set v1: {len(written)} procedural videos ({NUM_FRAMES} frames, "
        f"{SIZE}x{SIZE}, uint8 .npy arrays of shape (T, H, W, 3))\n"
        "made from the photographs that scikit-image ships, in the motion categories "
        f"{', '.join(CATEGORIES)}.\n"
        "Built by hparray.sample_videos from fixed seeds; manifest.csv gives each video's "
        "category and a caption.\n"
        "Safe to delete: hparray rebuilds it on first use.\n",
        encoding="utf-8",
    )
    return written


def _generate(
    category: str, index: int, seed: int, num_frames: int, size: int
) -> tuple[np.ndarray, str]:
    """Render a video and its caption; the caption states the motion the seed chose."""
    if category not in CATEGORIES:
        raise ValueError(f"unknown sample category {category!r}: use one of {CATEGORIES}")
    rng = np.random.default_rng(seed)
    photo = photo_for(category, index)
    render = {"pan": _pan, "zoom": _zoom, "rotate": _rotate, "objects": _objects}[category]
    frames, caption = render(rng, photo, num_frames, size)
    return (np.clip(frames, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8), caption


@functools.cache
def _working_photo(name: str, size: int) -> np.ndarray:
    """A photo as float32 RGB in [0, 1], anti-aliased down to a working size once per process."""
    if name.startswith("motorcycle_"):
        left, right, _ = skdata.stereo_motorcycle()
        image = left if name == "motorcycle_left" else right
    else:
        image = getattr(skdata, name)()
    rgb = np.asarray(image, dtype=np.float32) / 255.0
    if rgb.ndim == 2:
        rgb = np.repeat(rgb[..., None], 3, axis=2)
    return _resize_short(rgb[..., :3], _WORK_SCALE * size)


def _resize_short(image: np.ndarray, short: float) -> np.ndarray:
    """Resize so that the short side is `short` pixels, anti-aliased, keeping the aspect ratio."""
    h, w = image.shape[:2]
    scale = short / min(h, w)
    shape = (max(1, round(h * scale)), max(1, round(w * scale)), image.shape[2])
    out = resize(image, shape, order=1, anti_aliasing=scale < 1, preserve_range=True)
    return out.astype(np.float32)


def _base(photo: str, size: int, short: float) -> np.ndarray:
    """The photo at the resolution one video samples it from."""
    return _resize_short(_working_photo(photo, size), short)


def _camera(
    base: np.ndarray, center: tuple[float, float], angle: float, window: float, size: int
) -> np.ndarray:
    """One frame seen by a virtual camera: a `window`-pixel square of `base` centred on
    `center` (x, y) and rotated by `angle` radians, sampled bilinearly to size x size."""
    k = window / size
    a, b = k * math.cos(angle), k * math.sin(angle)
    half = (size - 1) / 2.0
    matrix = np.array(
        [
            [a, -b, center[0] - (a - b) * half],
            [b, a, center[1] - (b + a) * half],
            [0.0, 0.0, 1.0],
        ]
    )
    return warp(
        base, AffineTransform(matrix=matrix), output_shape=(size, size), order=1, mode="edge"
    )


def _direction(dx: float, dy: float) -> str:
    """Name an image-space direction (y points down) with one of eight compass words."""
    names = ("right", "up-right", "up", "up-left", "left", "down-left", "down", "down-right")
    sector = round(math.degrees(math.atan2(-dy, dx)) / 45.0) % 8
    return names[sector]


def _start_in(low: float, high: float, travel: float, rng: np.random.Generator) -> float:
    """A start coordinate in [low, high] from which moving by `travel` stays in [low, high]."""
    lo, hi = (low, high - travel) if travel >= 0 else (low - travel, high)
    return float(rng.uniform(lo, hi)) if hi > lo else (low + high - travel) / 2.0


def _fit_velocity(
    speed: float, angle: float, room: tuple[float, float], steps: int
) -> tuple[float, float]:
    """A velocity of at most `speed` along `angle` whose whole travel fits in `room` (x, y)."""
    vx, vy = speed * math.cos(angle), speed * math.sin(angle)
    shrink = min(
        1.0,
        room[0] / (abs(vx) * steps + 1e-9),
        room[1] / (abs(vy) * steps + 1e-9),
    )
    return vx * shrink, vy * shrink


def _pan(
    rng: np.random.Generator, photo: str, num_frames: int, size: int
) -> tuple[np.ndarray, str]:
    """A camera panning at constant velocity across a photo about twice the frame size."""
    base = _base(photo, size, size * rng.uniform(1.7, 2.2))
    h, w = base.shape[:2]
    margin = 1.0
    steps = num_frames - 1
    speed = rng.uniform(0.6, 1.6) * size / SIZE
    room = (w - size - 2 * margin, h - size - 2 * margin)
    vx, vy = _fit_velocity(speed, rng.uniform(0.0, 2.0 * math.pi), room, steps)
    half = size / 2.0
    x0 = _start_in(margin + half, w - margin - half, vx * steps, rng)
    y0 = _start_in(margin + half, h - margin - half, vy * steps, rng)
    frames = np.stack(
        [_camera(base, (x0 + vx * t, y0 + vy * t), 0.0, size, size) for t in range(num_frames)]
    )
    return frames, f"the camera pans {_direction(vx, vy)} across {PHOTOS[photo]}"


def _zoom(
    rng: np.random.Generator, photo: str, num_frames: int, size: int
) -> tuple[np.ndarray, str]:
    """A camera zooming in or out at a constant rate (geometric window size) about a fixed point."""
    base = _base(photo, size, size * 1.3)
    h, w = base.shape[:2]
    widest = size * 1.2
    factor = rng.uniform(1.4, 2.0)
    zoom_in = bool(rng.integers(2))
    cx = w / 2.0 + rng.uniform(-1.0, 1.0) * (w - widest - 2.0) / 2.0
    cy = h / 2.0 + rng.uniform(-1.0, 1.0) * (h - widest - 2.0) / 2.0
    steps = num_frames - 1
    frames = []
    for t in range(num_frames):
        progress = t / steps if zoom_in else 1.0 - t / steps
        frames.append(_camera(base, (cx, cy), 0.0, widest * factor ** (-progress), size))
    verb = "zooms in on" if zoom_in else "zooms out from"
    return np.stack(frames), f"the camera slowly {verb} {PHOTOS[photo]}"


def _rotate(
    rng: np.random.Generator, photo: str, num_frames: int, size: int
) -> tuple[np.ndarray, str]:
    """A photo turning at a constant angular speed about the frame centre."""
    base = _base(photo, size, size * rng.uniform(1.5, 1.8))
    h, w = base.shape[:2]
    reach = size / math.sqrt(2.0) + 1.0  # half-diagonal of the window: corners stay inside
    cx = w / 2.0 + rng.uniform(-1.0, 1.0) * max(0.0, w / 2.0 - reach)
    cy = h / 2.0 + rng.uniform(-1.0, 1.0) * max(0.0, h / 2.0 - reach)
    speed = math.radians(rng.uniform(0.7, 1.8)) * (1 if rng.integers(2) else -1)
    start = rng.uniform(0.0, 2.0 * math.pi)
    frames = np.stack(
        [_camera(base, (cx, cy), start + speed * t, size, size) for t in range(num_frames)]
    )
    # The camera turning one way (y down) makes the content turn the other way on screen.
    turn = "counterclockwise" if speed > 0 else "clockwise"
    return frames, f"{PHOTOS[photo]} rotates {turn} about the centre"


def _patch(rng: np.random.Generator, photo: str, side: int, size: int) -> tuple[np.ndarray, str]:
    """An RGBA sprite cut from a photo: a disk or a square with a dark outline and a one-pixel
    transparent border, so that bilinear sampling gives it anti-aliased edges."""
    source = _base(photo, size, size)
    y = int(rng.integers(0, source.shape[0] - side + 1))
    x = int(rng.integers(0, source.shape[1] - side + 1))
    rgb = source[y : y + side, x : x + side]
    round_shape = bool(rng.integers(2))
    r = (side - 1) / 2.0
    yy, xx = np.mgrid[0:side, 0:side] - r
    dist = np.hypot(xx, yy) if round_shape else np.maximum(abs(xx), abs(yy))
    alpha = np.clip(r + 0.5 - dist, 0.0, 1.0)
    outline = dist > r - 2.0
    rgb = np.where(outline[..., None], np.float32(0.08), rgb)
    sprite = np.zeros((side + 2, side + 2, 4), dtype=np.float32)
    sprite[1:-1, 1:-1, :3] = rgb
    sprite[1:-1, 1:-1, 3] = alpha
    return sprite, ("a round" if round_shape else "a square")


def _objects(
    rng: np.random.Generator, photo: str, num_frames: int, size: int
) -> tuple[np.ndarray, str]:
    """One or two photo patches gliding at constant velocity over a still photo background."""
    base = _base(photo, size, size * rng.uniform(1.0, 1.3))
    h, w = base.shape[:2]
    background = _camera(
        base,
        (rng.uniform(size / 2.0, w - size / 2.0), rng.uniform(size / 2.0, h - size / 2.0)),
        0.0,
        size,
        size,
    )
    others = [name for name in _PHOTO_NAMES if name != photo]
    steps = num_frames - 1
    margin = 2.0
    sprites = []
    parts = []
    for _ in range(1 + int(rng.integers(2))):
        source = others[int(rng.integers(len(others)))]
        side = int(rng.integers(round(0.22 * size), round(0.34 * size) + 1))
        sprite, shape = _patch(rng, source, side, size)
        room = size - side - 2 * margin
        speed = rng.uniform(0.5, 1.3) * size / SIZE
        vx, vy = _fit_velocity(speed, rng.uniform(0.0, 2.0 * math.pi), (room, room), steps)
        x0 = _start_in(margin, size - side - margin, vx * steps, rng)
        y0 = _start_in(margin, size - side - margin, vy * steps, rng)
        sprites.append((sprite, x0 - 1.0, y0 - 1.0, vx, vy))  # -1: the transparent border
        parts.append(f"{shape} patch of {PHOTOS[source]} moves {_direction(vx, vy)}")
    frames = np.empty((num_frames, size, size, 3), dtype=np.float64)
    for t in range(num_frames):
        frame = background.copy()
        for sprite, x0, y0, vx, vy in sprites:
            shift = AffineTransform(translation=(-(x0 + vx * t), -(y0 + vy * t)))
            layer = warp(
                sprite, shift, output_shape=(size, size), order=1, mode="constant", cval=0.0
            )
            alpha = layer[..., 3:]
            frame = frame * (1.0 - alpha) + layer[..., :3] * alpha
        frames[t] = frame
    return frames, f"{' and '.join(parts)} over {PHOTOS[photo]}"
