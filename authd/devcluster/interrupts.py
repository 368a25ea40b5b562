"""Signals for programs that build a cluster: stop on SIGTERM like on Ctrl-C, and never half tear down.

Python turns SIGINT (Ctrl-C) into KeyboardInterrupt, which unwinds through ``with DevCluster(...)`` and
so tears the cluster down; SIGTERM and SIGHUP would kill the process outright and leave everything
running. :func:`stop_signals_interrupt` makes them interrupt the same way. :func:`deferred` holds these
signals back while a teardown runs, so that a second Ctrl-C does not cut it short, and delivers them when
it is done.

Handlers can only be set from the main thread; elsewhere both are no-ops.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

_Handler = Callable[[int, FrameType | None], Any] | int | None


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _interrupt(signum: int, frame: FrameType | None) -> None:
    del frame
    raise KeyboardInterrupt(signal.Signals(signum).name)


@contextlib.contextmanager
def stop_signals_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM and SIGHUP raise KeyboardInterrupt, as SIGINT does."""
    if not _main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, _interrupt) for signum in STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@contextlib.contextmanager
def deferred() -> Iterator[list[int]]:
    """Within the block, stop signals are recorded, not acted on; afterwards the first is re-raised.

    Yields the list of signals received so far. Child processes started inside the block get the
    default dispositions (a caught signal is reset on exec), so they can still be stopped.
    """
    received: list[int] = []
    if not _main_thread():
        yield received
        return

    def record(signum: int, frame: FrameType | None) -> None:
        del frame
        received.append(signum)

    previous: dict[int, _Handler] = {signum: signal.signal(signum, record) for signum in STOP_SIGNALS}
    try:
        yield received
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if received:
        signal.raise_signal(received[0])
