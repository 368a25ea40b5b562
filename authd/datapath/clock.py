"""The datapath's time base: CLOCK_TAI nanoseconds, as ``bpf_ktime_get_tai_ns()`` returns them.

The program compares an auth entry's expiry with one helper call; Python converts a certificate's UTC
``notAfter`` exactly: ``tai_ns = unix_ns + offset``, where the offset is the whole number of seconds between
CLOCK_TAI and CLOCK_REALTIME read at conversion time (0 unless an NTP daemon has set the kernel's TAI
offset). CLOCK_TAI follows wall-clock steps, so an expiry written before an NTP step stays right after it.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

from authd.errors import DatapathError

NS_PER_S = 1_000_000_000
U64_MAX = (1 << 64) - 1
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def tai_offset_ns() -> int:
    """CLOCK_TAI minus CLOCK_REALTIME, rounded to whole seconds (the kernel keeps it whole)."""
    tai = time.clock_gettime_ns(time.CLOCK_TAI)
    real = time.clock_gettime_ns(time.CLOCK_REALTIME)
    return (tai - real + NS_PER_S // 2) // NS_PER_S * NS_PER_S


def now_tai_ns() -> int:
    """The datapath's current time."""
    return time.clock_gettime_ns(time.CLOCK_TAI)


def unix_ns(when: datetime) -> int:
    """Exact nanoseconds since the Unix epoch of an aware datetime."""
    if when.tzinfo is None:
        raise DatapathError(f"datapath: naive datetime {when.isoformat()} has no time zone")
    delta = when - _EPOCH
    return (delta.days * 86400 + delta.seconds) * NS_PER_S + delta.microseconds * 1000


def to_tai_ns(when: datetime, offset_ns: int | None = None) -> int:
    """Convert an aware datetime to the datapath's time base, clamped to the u64 range."""
    offset = tai_offset_ns() if offset_ns is None else offset_ns
    return min(max(unix_ns(when) + offset, 0), U64_MAX)


def from_tai_ns(tai_ns: int, offset_ns: int | None = None) -> datetime:
    """Convert a datapath time to an aware UTC datetime (microsecond precision)."""
    offset = tai_offset_ns() if offset_ns is None else offset_ns
    ns = tai_ns - offset
    return _EPOCH + timedelta(seconds=ns // NS_PER_S, microseconds=(ns % NS_PER_S) // 1000)
