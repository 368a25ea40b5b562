"""Exceptions Python cannot raise anywhere (``sys.unraisablehook``), logged as events, at a limited rate.

The one a peer can cause at will: the ssl module decodes a TLS client's SNI as ASCII before it calls the
listener's SNI callback, and a name with other bytes fails there, inside OpenSSL's callback, where the
error cannot propagate. Python prints it to stderr as a 5-line traceback, once per handshake, outside
every rate limit. Here such a name is counted (``invalid_sni``) and logged at most once per interval with
the count since the last line; the handshake itself fails as before. Anything else unraisable is an
authd bug: logged the same way, with its traceback.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import structlog

log = structlog.get_logger(__name__)

INTERVAL = 10.0


class UnraisableLog:
    """A ``sys.unraisablehook``: counts what it sees, logs at most once per ``interval`` per kind."""

    def __init__(self, interval: float = INTERVAL, clock: Callable[[], float] = time.monotonic) -> None:
        """Log each kind at most once per ``interval`` seconds of ``clock``."""
        self._interval = interval
        self._clock = clock
        self.counts: dict[str, int] = {}
        self._unlogged: dict[str, int] = {}
        self._last: dict[str, float] = {}

    def __call__(self, unraisable: Any) -> None:  # noqa: ANN401 - sys.UnraisableHookArgs, not importable
        """Count and maybe log one unraisable exception."""
        error = unraisable.exc_value
        invalid_sni = isinstance(error, UnicodeDecodeError) and isinstance(unraisable.object, bytes)
        kind = "invalid_sni" if invalid_sni else "unraisable"
        self.counts[kind] = self.counts.get(kind, 0) + 1
        self._unlogged[kind] = self._unlogged.get(kind, 0) + 1
        now = self._clock()
        if kind in self._last and now - self._last[kind] < self._interval:
            return
        self._last[kind] = now
        count, self._unlogged[kind] = self._unlogged[kind], 0
        if invalid_sni:
            log.warning("attest: TLS client sent a non-ASCII SNI, handshake refused", count=count)
        else:
            log.error("unraisable exception", count=count, where=repr(unraisable.object), exc_info=error)


@contextlib.contextmanager
def captured(hook: UnraisableLog) -> Iterator[UnraisableLog]:
    """Install ``hook`` as ``sys.unraisablehook`` for the block; the previous hook comes back after."""
    previous, sys.unraisablehook = sys.unraisablehook, hook
    try:
        yield hook
    finally:
        sys.unraisablehook = previous
