"""Frame strips for the page: the truth, the un-fine-tuned prediction and the fine-tuned one, a few
frames after condition_frames, for the first videos of each config."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hparray.config import Settings
from hparray.metrics import METRIC_LABELS
from hparray.report.compute import Report
from hparray.report.format import fmt_metric
from hparray.report.records import BASELINE_INFERENCE, TaskRow

STRIP_VIDEOS = 2  # videos per config in the page's frame strips
STRIP_FRAMES = 4  # frames after condition_frames per strip
STRIP_HEIGHT = 96  # pixels per frame in a strip (small frames are enlarged, large ones shrunk)


@dataclass
class Strip:
    """One video under one config: truth, un-fine-tuned and fine-tuned frames after condition_frames."""

    config: str
    video: str
    category: str
    caption: str
    png: bytes


def frame_strips(report: Report, rows: list[TaskRow], settings: Settings) -> dict[str, list[Strip]]:
    """Strips per config hash for up to STRIP_VIDEOS scored videos, taken category by category
    (first video of each category, then the second, ...), so that every config shows the same
    videos as far as they are done and the strips cover more than one kind of motion."""
    data = settings.data
    inference = {(row.condition_frames, row.video): row for row in rows if row.search == BASELINE_INFERENCE}
    per_category: dict[str, list[str]] = {}
    for row in sorted(rows, key=lambda r: r.video):
        if row.video not in per_category.setdefault(row.category, []):
            per_category[row.category].append(row.video)
    order = {video: (rank, category) for category, videos in per_category.items()
             for rank, video in enumerate(videos)}
    chosen: dict[str, dict[str, TaskRow]] = {}
    for row in sorted(rows, key=lambda r: order[r.video]):
        if row.search != BASELINE_INFERENCE and row.status == "done":
            picked = chosen.setdefault(row.config_hash, {})
            if len(picked) < STRIP_VIDEOS:
                picked.setdefault(row.video, row)  # the baseline config is met once per search
    truth_cache: dict[str, np.ndarray | None] = {}
    strips: dict[str, list[Strip]] = {}
    for config_hash, picked in chosen.items():
        for row in picked.values():
            if row.video_path not in truth_cache:
                truth_cache[row.video_path] = _try(lambda: _read_truth(row.video_path, data.num_frames,
                                                                       data.height, data.width))
            reference = inference.get((row.condition_frames, row.video))
            plain = _try(lambda: _load_frames(reference.artifact_dir, settings)) if reference else None
            tuned = _try(lambda: _load_frames(row.artifact_dir, settings))
            png = _strip_png(truth_cache[row.video_path], plain, tuned, row.condition_frames)
            parts = []
            for m in report.metrics:
                if (score := row.score(m)) is not None:
                    plain_score = reference.score(m) if reference else None
                    parts.append(f"{METRIC_LABELS[m]} fine-tuned {fmt_metric(score, m)}"
                                 + (f", no fine-tune {fmt_metric(plain_score, m)}" if plain_score is not None else ""))
            strips.setdefault(config_hash, []).append(Strip(row.config, row.video, row.category, "; ".join(parts), png))
    return strips


def _try(load: Any) -> np.ndarray | None:
    """Frames, or None when a file is gone: the strip shows a grey 'missing' row instead."""
    try:
        return load()
    except Exception:
        return None


def _read_truth(path: str, num_frames: int, height: int, width: int) -> np.ndarray:
    from hparray.videos import read_video

    return read_video(path, num_frames, height, width)


def _load_frames(artifact_dir: str | None, settings: Settings) -> np.ndarray | None:
    if not artifact_dir:
        return None
    folder = Path(artifact_dir)
    if not folder.is_absolute():
        folder = settings.config_dir.parent / folder
    from hparray.artifacts import read_frames

    return read_frames(folder)


def _strip_png(truth: np.ndarray | None, plain: np.ndarray | None, tuned: np.ndarray | None, cf: int) -> bytes:
    """A labelled grid: rows truth / no fine-tune / fine-tuned, columns frames after condition_frames."""
    from PIL import Image, ImageDraw

    known = next((a for a in (truth, tuned, plain) if a is not None), None)
    length = known.shape[0] if known is not None else cf + 1
    h, w = (known.shape[1], known.shape[2]) if known is not None else (STRIP_HEIGHT, STRIP_HEIGHT)
    scale = STRIP_HEIGHT / h
    fh, fw = STRIP_HEIGHT, max(1, round(w * scale))
    indices = sorted({int(i) for i in np.linspace(cf, length - 1, STRIP_FRAMES).round()}) if length > cf else []
    label_w, header_h, gap = 92, 16, 3
    width = label_w + len(indices) * (fw + gap)
    height = header_h + 3 * (fh + gap)
    canvas = Image.new("RGB", (max(width, label_w + 10), height), "white")
    draw = ImageDraw.Draw(canvas)
    for col, t in enumerate(indices):
        draw.text((label_w + col * (fw + gap) + 2, 2), f"frame {t}", fill="black")
    for r, (label, frames) in enumerate((("truth", truth), ("no fine-tune", plain), ("fine-tuned", tuned))):
        top = header_h + r * (fh + gap)
        draw.text((4, top + fh // 2 - 6), label if frames is not None else f"{label}\n(missing)", fill="black")
        for col, t in enumerate(indices):
            left = label_w + col * (fw + gap)
            if frames is None or t >= len(frames):
                draw.rectangle([left, top, left + fw - 1, top + fh - 1], fill=(200, 200, 200))
                continue
            pixels = (np.clip(frames[t], 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
            resample = Image.Resampling.NEAREST if scale >= 1 else Image.Resampling.BILINEAR
            tile = Image.fromarray(pixels).resize((fw, fh), resample)
            canvas.paste(tile, (left, top))
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG")
    return buffer.getvalue()

