"""Who may reach the channel's TLS handshake, decided on the accepted socket before any byte is read.

Only addresses of nodes in cluster state (and of an optional configured allowlist) are admitted; every
other source is closed at once, which costs an accept and a close, never a handshake. Admitted sources
then pass, in order: a cap on handshakes in flight per source, a token bucket per source (an IPv6
source counts as its /64, so one host cannot spread itself over its addresses), a global token bucket
and a global cap on handshakes in flight. A source that hits its own limit takes nothing from the
global ones, so one noisy node cannot drain the capacity the others need.
"""

from __future__ import annotations

import ipaddress
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable

from authd.config.model import AttestConfig

PER_SOURCE_IN_FLIGHT = 4
"""Handshakes one source may have in flight: a node needs one channel, plus a reconnect or two."""


def source_key(address: str) -> str:
    """The unit limits count by: the address itself for IPv4, its /64 for IPv6."""
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class _Bucket:
    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate, self.burst, self.tokens, self.stamp = rate, burst, burst, now

    def take(self, now: float) -> bool:
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


class Admission:
    """The admission decision and its bookkeeping (call :meth:`release` for every admitted source)."""

    def __init__(self, config: AttestConfig, clock: Callable[[], float], *, max_sources: int = 4096) -> None:
        """Limits from ``config``; the allowlist from ``config.allow_sources``."""
        self._rate, self._burst = config.per_source_rate, float(config.per_source_burst)
        self._global = _Bucket(config.global_rate, config.global_rate, clock())
        self._max_in_flight = config.max_concurrent_handshakes
        self._allowlist = tuple(config.allow_sources)
        self._clock = clock
        self._max_sources = max_sources
        self._nodes: frozenset[str] = frozenset()
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()
        self._in_flight: Counter[str] = Counter()
        self._total_in_flight = 0

    def set_node_addresses(self, addresses: Iterable[str]) -> None:
        """The addresses of the nodes in cluster state (replaces the previous set)."""
        self._nodes = frozenset(str(ipaddress.ip_address(a)) for a in addresses)

    def admit(self, address: str) -> str | None:
        """None if ``address`` may start a handshake now, else the refusal reason."""
        ip = ipaddress.ip_address(address)
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if str(ip) not in self._nodes and not any(ip in net for net in self._allowlist):
            return "not-a-node"
        key = source_key(address)
        if self._in_flight[key] >= PER_SOURCE_IN_FLIGHT:
            return "source-busy"
        now = self._clock()
        bucket = self._buckets.pop(key, None) or _Bucket(self._rate, self._burst, now)
        self._buckets[key] = bucket
        if len(self._buckets) > self._max_sources:
            self._buckets.popitem(last=False)
        if not bucket.take(now):
            return "rate-limited"
        if self._total_in_flight >= self._max_in_flight or not self._global.take(now):
            return "overloaded"
        self._in_flight[key] += 1
        self._total_in_flight += 1
        return None

    def release(self, address: str) -> None:
        """An admitted handshake ended (the channel is up, or it failed)."""
        key = source_key(address)
        self._in_flight[key] -= 1
        if self._in_flight[key] <= 0:
            del self._in_flight[key]
        self._total_in_flight -= 1
