"""Largest-remainder rounding, written once: seats per category of the video sample, and the
throttle shared among several job arrays."""

from __future__ import annotations

from collections.abc import Sequence


def largest_remainder(weights: Sequence[float], total: int, *, low: Sequence[int], high: Sequence[int],
                      order: Sequence[int] | None = None) -> list[int]:
    """Split `total` into whole shares proportional to `weights`, each within [low, high].

    Each share starts at its quota's whole part, clamped; then seats come back one by one from the
    share furthest above its quota, or go to the one furthest below it, ties to the lower `order`.
    When the lows alone reach `total`, the lows are the answer (every share keeps its minimum).
    """
    count = len(weights)
    order = list(order) if order is not None else list(range(count))
    if sum(low) >= total:
        return list(low)
    quotas = [total * weight / sum(weights) for weight in weights]
    seats = [min(hi, max(lo, int(quota))) for quota, lo, hi in zip(quotas, low, high)]
    while sum(seats) > total:
        i = max((i for i in range(count) if seats[i] > low[i]), key=lambda i: (seats[i] - quotas[i], -order[i]))
        seats[i] -= 1
    while sum(seats) < total:
        open_ = [i for i in range(count) if seats[i] < high[i]]
        if not open_:
            break
        i = max(open_, key=lambda i: (quotas[i] - seats[i], -order[i]))
        seats[i] += 1
    return seats
