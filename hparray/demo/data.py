"""The demo model's training data: the sample set's procedural generator on seeds and photos the
sample set does not use, so the sample videos stay held out."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hparray.demo.sample_videos import CATEGORIES, PHOTOS, VIDEOS_PER_CATEGORY, generate_video, photo_for
from hparray.videos import _fit, _to_rgb01

TRAIN_SEED_BASE = 1000
"""Training videos use seeds from here on; the sample set uses 0..27."""

TRAIN_PHOTO_INDICES = tuple(range(VIDEOS_PER_CATEGORY, len(PHOTOS)))
"""Photo indices per category that the sample set's videos of that category do not show."""


@dataclass(frozen=True)
class TrainingVideo:
    """Where one training video comes from: the sample set's generator with other seeds."""

    category: str
    index: int
    seed: int

    @property
    def photo(self) -> str:
        return photo_for(self.category, self.index)


def training_videos(count: int) -> list[TrainingVideo]:
    """`count` videos cycling over the categories, on seeds TRAIN_SEED_BASE.. and on photos
    the sample set does not show in the same category."""
    return [
        TrainingVideo(
            category=CATEGORIES[k % len(CATEGORIES)],
            index=TRAIN_PHOTO_INDICES[(k // len(CATEGORIES)) % len(TRAIN_PHOTO_INDICES)],
            seed=TRAIN_SEED_BASE + k,
        )
        for k in range(count)
    ]


def render(video: TrainingVideo, num_frames: int, size: int) -> np.ndarray:
    """(T, size, size, 3) float32 frames, exactly as `read_video` would read the same video
    from the sample set (rendered at the set's 128 pixels, resized and cropped)."""
    frames = generate_video(video.category, video.index, video.seed)[:num_frames]
    return np.stack([_fit(_to_rgb01(frame, video.photo), size, size) for frame in frames])

