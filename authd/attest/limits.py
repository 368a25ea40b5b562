"""Admission limits of the attestation listener: per-source token buckets, bounded in memory.

A connection takes a token when it is accepted, before anything is known about it; the listener gives the
token back once the connection turned out to be a verified node's attestation. So the rate limits what a
source can make the listener do for nothing (garbage, stalls, refused handshakes), while a peer node that
has many identities to attest is bounded only by the cap on handshakes in flight: with 20 per second, a
node attesting 1000 identities would otherwise need close to a minute, and each refusal would cost it a
backoff on top.
"""

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

    def refund(self, source: str) -> None:
        """Give back the token of an admission that proved legitimate (a served attestation)."""
        bucket = self._buckets.get(source)
        if bucket is not None:
            tokens, stamp = bucket
            self._buckets[source] = (min(self._burst, tokens + 1), stamp)
