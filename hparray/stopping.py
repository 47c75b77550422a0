"""Opt-in sequential stopping (`stopping:` in base.yaml): stop running a fine-tune config once it is
significantly worse than its search's baseline, so its remaining videos cost no GPU time.

After each finished row, every fine-tune config that still has pending rows is compared with the
baseline config of each search it belongs to, on the paired per-video differences of
`stopping.metric` over the videos both have done (the pairing the report's verdicts use). Looks
happen from `min_videos` paired videos on, one per video, up to the config's planned videos n:
K = n - min_videos + 1 planned looks. At each look a one-sided exact Wilcoxon signed-rank test
(the config is worse) is done at alpha / K: Bonferroni over the planned looks, so the chance that a
config that is not worse is ever stopped stays at or below alpha whatever the dependence between
looks (docs/statistics.md has the argument and the simulation). Only "worse" stops a config, never
"better"; a search's baseline config is never stopped; the un-fine-tuned rows are never touched.

A stopped config's pending rows become 'skipped' (`store.stopping.skip_pending`), which no claim
takes; with stopping turned off, `plan` and `submit` put them back to pending (`resume_if_off`).
"""

from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from hparray.config import Settings, StoppingSettings
from hparray.metrics import HIGHER_IS_BETTER
from hparray.store import Store
from hparray.store.records import ReportRow, StopRecord
from hparray.store.stopping import resume_skipped, skip_pending
from hparray.tasks import TaskOutcome

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- the test


@lru_cache(maxsize=64)
def _upper_tail(n: int) -> np.ndarray:
    """P(W+ >= w) for w = 0..n(n+1)/2 under the signed-rank null (each sign +/- with 1/2, no ties)."""
    counts = np.zeros(n * (n + 1) // 2 + 1)
    counts[0] = 1.0
    for k in range(1, n + 1):
        shifted = np.zeros_like(counts)
        shifted[k:] = counts[:-k]
        counts = counts + shifted
    return np.cumsum(counts[::-1])[::-1] / 2.0 ** n


def signed_rank_p(x: np.ndarray) -> float | None:
    """One-sided Wilcoxon signed-rank p that `x` tends to be > 0: P(W+ >= observed), exact from the
    null distribution when no value is 0 and no two |x| tie (then the same p as
    `scipy.stats.wilcoxon(x, alternative="greater")`, only faster), else scipy's, as the report does.
    None below 2 values, 1.0 when every value is 0."""
    x = np.asarray(x, dtype=np.float64)
    n = len(x)
    if n < 2:
        return None
    if not np.any(x != 0):
        return 1.0
    order = np.argsort(np.abs(x))
    ordered = np.abs(x)[order]
    if n > 50 or ordered[0] == 0 or bool((ordered[1:] == ordered[:-1]).any()):
        from hparray.report.stats import wilcoxon_p

        return wilcoxon_p(x, "greater")
    w_plus = int((np.flatnonzero(x[order] > 0) + 1).sum())  # the ranks of the positive values
    return float(_upper_tail(n)[w_plus])


def worse_p(differences: np.ndarray, metric: str) -> float | None:
    """One-sided p that a config is worse than its baseline; differences = config - baseline per video."""
    sign = 1.0 if HIGHER_IS_BETTER[metric] else -1.0
    return signed_rank_p(-sign * np.asarray(differences, dtype=np.float64))


def planned_looks(planned_videos: int, min_videos: int) -> int:
    """K: one look per video from `min_videos` paired videos to the planned number."""
    return max(1, planned_videos - min_videos + 1)


@dataclass(frozen=True)
class Look:
    """One look at one config against one baseline: stop when p < boundary and the mean is worse."""

    videos: int  # paired videos (both done)
    planned: int
    looks: int  # K
    boundary: float  # alpha / (K * baselines)
    p_value: float | None  # one-sided, config worse; None before min_videos
    mean_diff: float | None  # config - baseline
    stop: bool


def decide(differences: Sequence[float] | np.ndarray, planned_videos: int, settings: StoppingSettings,
           baselines: int = 1) -> Look:
    """The decision at one look, from the paired differences (config minus baseline, one per video
    both have done) of `settings.metric`. `baselines`: distinct baselines the config is tested
    against (a config in several searches); the boundary is divided by them too."""
    diffs = np.asarray(differences, dtype=np.float64)
    looks = planned_looks(planned_videos, settings.min_videos)
    boundary = settings.alpha / (looks * max(1, baselines))
    mean = float(diffs.mean()) if len(diffs) else None
    if len(diffs) < settings.min_videos or mean is None:
        return Look(len(diffs), planned_videos, looks, boundary, None, mean, False)
    p = worse_p(diffs, settings.metric)
    sign = 1.0 if HIGHER_IS_BETTER[settings.metric] else -1.0
    stop = p is not None and p < boundary and sign * mean < 0
    return Look(len(diffs), planned_videos, looks, boundary, p, mean, stop)


# ---------------------------------------------------------------- the sweep's configs


@dataclass(frozen=True)
class Decision:
    """A config against one search's baseline; where the search's configs condition on different
    frame counts it must also be worse on the frames after the largest (`window`) to stop."""

    config_hash: str
    name: str
    search: str
    metric: str
    look: Look
    window: Look | None = None

    @property
    def stop(self) -> bool:
        return self.look.stop and (self.window is None or self.window.stop)

    def record(self) -> StopRecord:
        assert self.look.p_value is not None
        return StopRecord(config_hash=self.config_hash, search=self.search, metric=self.metric,
                          videos=self.look.videos, planned=self.look.planned, looks=self.look.looks,
                          p_value=self.look.p_value, window_p_value=self.window.p_value if self.window else None,
                          boundary=self.look.boundary, skipped=0, stopped_at=0.0)


def _window_mean(row: ReportRow, metric: str, first: int, last: int) -> float | None:
    """The row's mean metric over frames first..last, from its per-frame scores (None without them)."""
    if row.status != "done" or not row.per_frame:
        return None
    stored = json.loads(row.per_frame)
    values, start = stored.get(metric) or [], int(stored["first_frame"])
    if first < start or last - start >= len(values):
        return None
    return float(np.mean(values[first - start:last - start + 1]))


def _last_frame(row: ReportRow, metric: str) -> int | None:
    if row.status != "done" or not row.per_frame:
        return None
    stored = json.loads(row.per_frame)
    return int(stored["first_frame"]) + len(stored.get(metric) or []) - 1


def decisions(rows: Sequence[ReportRow], settings: StoppingSettings) -> list[Decision]:
    """Every fine-tune config with pending rows that is no search's baseline, against the baseline of
    each search holding it (`rows`: the store's `report_rows`, a task once per search)."""
    metric = settings.metric
    rows = [r for r in rows if r.kind == "finetune" and r.search is not None]
    members: dict[str, dict[str, ReportRow]] = defaultdict(dict)  # search -> config -> a row of it
    tasks: dict[int, ReportRow] = {}
    for r in rows:
        members[r.search or ""].setdefault(r.config_hash, r)
        tasks[r.task_id] = r
    planned: dict[str, int] = defaultdict(int)
    pending: dict[str, int] = defaultdict(int)
    scores: dict[str, dict[str, float]] = defaultdict(dict)
    by_config: dict[str, list[ReportRow]] = defaultdict(list)
    for r in tasks.values():
        planned[r.config_hash] += 1
        pending[r.config_hash] += r.status == "pending"
        by_config[r.config_hash].append(r)
        value = getattr(r, metric)
        if r.status == "done" and value is not None:
            scores[r.config_hash][r.video] = float(value)
    baselines = {search: next((h for h, r in configs.items() if r.is_baseline), None)
                 for search, configs in members.items()}
    never = {h for h in baselines.values() if h is not None}
    found = []
    for config in sorted(h for h in planned if pending[h] and h not in never):
        against: dict[str, list[str]] = defaultdict(list)  # baseline -> the searches holding both
        for search, configs in sorted(members.items()):
            reference = baselines[search]
            if config in configs and reference is not None:
                against[reference].append(search)
        for reference, searches in against.items():
            videos = sorted(set(scores[config]) & set(scores[reference]))
            diffs = [scores[config][v] - scores[reference][v] for v in videos]
            look = decide(diffs, planned[config], settings, len(against))
            window = None
            frames = {r.condition_frames for s in searches for r in members[s].values()}
            if look.stop and len(frames) > 1:
                window = _window_look(by_config[config], by_config[reference], max(frames), planned[config],
                                      settings, len(against))
            found.append(Decision(config, members[searches[0]][config].name or config, searches[0], metric, look,
                                  window))
    return found


def _window_look(config_rows: list[ReportRow], reference_rows: list[ReportRow], first: int, planned: int,
                 settings: StoppingSettings, baselines: int) -> Look:
    """The same look on the frames from `first` (the search's largest condition_frames) to the last:
    the same frames for both, so a config is not stopped for having been given a harder task."""
    metric = settings.metric
    last = min((f for r in config_rows + reference_rows if (f := _last_frame(r, metric)) is not None), default=-1)
    own = {r.video: m for r in config_rows if (m := _window_mean(r, metric, first, last)) is not None}
    ref = {r.video: m for r in reference_rows if (m := _window_mean(r, metric, first, last)) is not None}
    videos = sorted(set(own) & set(ref))
    return decide([own[v] - ref[v] for v in videos], planned, settings, baselines)


# ---------------------------------------------------------------- in the worker, and on resume


def look(store: Store, settings: StoppingSettings, now: float) -> list[StopRecord]:
    """Stop every config that is now significantly worse than a baseline: its pending rows skipped."""
    stopped = []
    for decision in decisions(store.report_rows(), settings):
        if not decision.stop:
            continue
        record = decision.record()
        skipped = skip_pending(store, record, now)
        if skipped:
            log.info("sequential stopping: %s stopped after %d videos (p=%.4g < %.4g against the baseline of "
                     "search %s): %d pending rows skipped", decision.name, record.videos, record.p_value,
                     record.boundary, record.search, skipped)
            stopped.append(record)
    return stopped


Settle = Callable[[TaskOutcome, bool], None]


def with_stopping(settings: Settings, store: Store, settle: Settle) -> Settle:
    """The worker's `settle`, then a look after every row its attempt recorded (stopping enabled).
    A look that fails (the database busy) is logged; the next finished row looks again."""
    if not settings.stopping.enabled:
        return settle

    def settle_then_look(outcome: TaskOutcome, won: bool) -> None:
        settle(outcome, won)
        if not won or outcome.status != "done":
            return
        try:
            look(store, settings.stopping, time.time())
        except Exception as err:
            log.warning("sequential stopping: could not look (%s); the next finished row looks again", err)

    return settle_then_look


def resume_if_off(settings: Settings, store: Store, now: float, dry_run: bool = False) -> int:
    """With stopping off, every skipped row is pending again (what `plan` and `submit` do first);
    returns how many (with `dry_run`, how many would be)."""
    if settings.stopping.enabled:
        return 0
    if dry_run:
        return store.task_counts().skipped
    return resume_skipped(store, now)
