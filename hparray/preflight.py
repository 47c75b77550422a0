"""Checks that must pass before GPU time is spent; `submit` runs them itself."""

from __future__ import annotations

from hparray.config import Settings
from hparray.metrics import require_lpips


def before_submit(settings: Settings) -> None:
    """Refuse to start a sweep that would fail on its first task (LPIPS weights missing)."""
    if "lpips" in settings.metrics:
        require_lpips()
