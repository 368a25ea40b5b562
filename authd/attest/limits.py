"""Admission limits of the attestation listener: per-source token buckets, bounded in memory."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable


class SourceRateLimiter:
    """A token bucket per source address; the least recently seen sources are forgotten first."""

    def __init__(
        self, rate: float, burst: int, clock: Callable[[], float], *, max_sources: int = 4096
    ) -> None:
        """Allow ``rate`` admissions per second per source, ``burst`` at once."""
        self._rate = rate
        self._burst = float(burst)
        self._clock = clock
        self._max_sources = max_sources
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def admit(self, source: str) -> bool:
        """Take one token for ``source``; False when its bucket is empty."""
        now = self._clock()
        tokens, stamp = self._buckets.pop(source, (self._burst, now))
        tokens = min(self._burst, tokens + (now - stamp) * self._rate)
        admitted = tokens >= 1
        self._buckets[source] = (tokens - 1 if admitted else tokens, now)
        if len(self._buckets) > self._max_sources:
            self._buckets.popitem(last=False)
        return admitted
