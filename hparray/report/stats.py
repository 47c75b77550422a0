"""The statistics of the report, each stated once: bootstrap CIs of means, paired comparisons
with the Wilcoxon signed-rank test, Holm's adjustment, and the verdict on a search's best value
(see hparray/report/__init__.py for the conventions, docs/statistics.md for why)."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np

from hparray.metrics import HIGHER_IS_BETTER

BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0
CONFIDENCE = 0.95
ALPHA = 0.05


@dataclass
class Estimate:
    """Mean of one metric over a config's scored videos, with its spread and bootstrap CI."""

    n: int
    mean: float | None
    std: float | None
    ci_low: float | None
    ci_high: float | None


@dataclass
class Comparison:
    """Paired per-video differences (config minus reference) of one metric."""

    reference: str
    pairs: int
    mean_diff: float | None
    ci_low: float | None
    ci_high: float | None
    p_value: float | None
    p_holm: float | None
    improved: int
    worse: int
    ties: int



def bootstrap_ci(values: np.ndarray) -> tuple[float, float] | None:
    """Percentile bootstrap CI of the mean (see the module docstring for the exact procedure)."""
    n = len(values)
    if n == 0:
        return None
    if n == 1:
        return float(values[0]), float(values[0])
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    means = values[rng.integers(0, n, size=(BOOTSTRAP_RESAMPLES, n))].mean(axis=1)
    tail = (1.0 - CONFIDENCE) / 2.0 * 100.0
    low, high = np.percentile(means, [tail, 100.0 - tail])
    return float(low), float(high)


def estimate(by_video: dict[str, float]) -> Estimate:
    """Mean, std and CI of the values, taken in video-name order (the CI depends on the order)."""
    values = np.array([by_video[v] for v in sorted(by_video)], dtype=np.float64)
    ci = bootstrap_ci(values)
    return Estimate(
        n=len(values), mean=float(values.mean()) if len(values) else None,
        std=float(values.std(ddof=1)) if len(values) >= 2 else None,
        ci_low=ci[0] if ci else None, ci_high=ci[1] if ci else None,
    )


def wilcoxon_p(differences: np.ndarray, alternative: str = "two-sided") -> float | None:
    """Wilcoxon signed-rank p ('two-sided', or 'greater': the differences tend to be > 0); None
    below 2 pairs, 1.0 when nothing differs. Exact for up to 50 pairs without ties or zeros."""
    if len(differences) < 2:
        return None
    if not np.any(differences != 0):
        return 1.0
    from scipy.stats import wilcoxon

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy warns about ties and small samples; p is still defined
        p = float(wilcoxon(differences, alternative=alternative).pvalue)
    return p if math.isfinite(p) else None


def better_p(differences: np.ndarray, metric: str) -> float | None:
    """One-sided p that a config beats its reference; differences = config - reference per video."""
    sign = 1.0 if HIGHER_IS_BETTER[metric] else -1.0
    return wilcoxon_p(sign * np.asarray(differences, dtype=np.float64), "greater")


@dataclass(frozen=True)
class Verdict:
    """A search's best value for one metric, and whether it beats the baseline family-wise."""

    config: str
    p_value: float | None  # one-sided, unadjusted
    p_holm: float | None  # Holm over the search's planned non-baseline configs
    family: int
    significant: bool


def search_verdict(differences: dict[str, np.ndarray], means: dict[str, float], baseline: str,
                   metric: str, alpha: float = ALPHA) -> Verdict:
    """The verdict for ONE metric of ONE search.

    `differences`: every planned non-baseline config -> its paired differences from the baseline
    (empty while no video has both); `means`: config -> mean, the baseline's included. The best
    config is the best mean (a tie goes to the baseline). Its claim "better than the baseline" is
    significant when its one-sided Wilcoxon p, Holm-adjusted over all planned non-baseline configs
    (one not yet testable counts as p = 1, so a partial sweep keeps the family's size), is below
    `alpha`, and its mean difference is in the better direction. Holm controls the family-wise
    error strongly, so the chance of a false verdict stays at or below alpha whichever config the
    means select (docs/statistics.md)."""
    sign = 1.0 if HIGHER_IS_BETTER[metric] else -1.0
    names = list(differences)
    raw = [better_p(differences[name], metric) for name in names]
    adjusted = dict(zip(names, holm([1.0 if p is None else p for p in raw])))
    top = max(means, key=lambda name: (sign * means[name], name == baseline))
    if top == baseline or top not in differences:
        return Verdict(top, None, None, len(names), False)
    diffs = np.asarray(differences[top], dtype=np.float64)
    p = raw[names.index(top)]
    significant = len(diffs) > 0 and sign * float(diffs.mean()) > 0 and adjusted[top] < alpha
    return Verdict(top, p, adjusted[top], len(names), significant)


def compare(metric: str, config: dict[str, float], reference: dict[str, float], name: str) -> Comparison:
    """Paired differences over the videos both have scored, in video-name order."""
    videos = sorted(set(config) & set(reference))
    diffs = np.array([config[v] - reference[v] for v in videos], dtype=np.float64)
    sign = 1.0 if HIGHER_IS_BETTER[metric] else -1.0
    ci = bootstrap_ci(diffs)
    return Comparison(
        reference=name, pairs=len(videos), mean_diff=float(diffs.mean()) if len(diffs) else None,
        ci_low=ci[0] if ci else None, ci_high=ci[1] if ci else None, p_value=wilcoxon_p(diffs), p_holm=None,
        improved=int(np.sum(sign * diffs > 0)), worse=int(np.sum(sign * diffs < 0)), ties=int(np.sum(diffs == 0)),
    )


def holm(p_values: list[float]) -> list[float]:
    """Holm step-down adjusted p-values, in the input order."""
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    adjusted = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted

