"""A cumulative histogram of observed values (latencies), kept by the component that measures them.

Components record what they measured here and nothing else; the metrics collector reads the buckets at
scrape time and exports them as a Prometheus histogram. Memory is fixed by the bucket bounds, however
long the daemon runs.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

LATENCY_BOUNDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
"""Seconds: from a loopback handshake (about a millisecond) to a client timeout."""


class Histogram:
    """Counts of observations per bucket (upper bounds, inclusive), their sum and their count."""

    def __init__(self, bounds: Sequence[float] = LATENCY_BOUNDS) -> None:
        """``bounds``: increasing upper bounds; values above the last one count only in +Inf."""
        if list(bounds) != sorted(set(bounds)):
            raise ValueError("histogram: bounds must be strictly increasing")
        self.bounds = tuple(bounds)
        self._counts = [0] * (len(self.bounds) + 1)  # the last slot is (last bound, +Inf)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        """Record one value."""
        self._counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def cumulative(self) -> list[tuple[float, int]]:
        """``(upper bound, observations <= bound)`` for every bound, ending with ``(inf, count)``."""
        result: list[tuple[float, int]] = []
        running = 0
        for bound, count in zip((*self.bounds, float("inf")), self._counts, strict=True):
            running += count
            result.append((bound, running))
        return result
