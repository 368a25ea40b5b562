"""The ring-buffer consumer: reads records as they arrive, decodes them and hands them on.

Two rings: auth-required events have one of their own (``auth_events``), so that a burst of flow events
cannot cost the event on-demand attestation depends on; flow events use ``events``. Auth-required events
go to the callable the composition root passes (the auth manager), flow events to the flow log. Neither
may block: the consumer is the only reader of the rings, and while it waits the kernel drops new events
(counted as auth_events_lost and flow_events_lost). The auth ring is read first on every wake-up.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Protocol

import structlog

from authd.datapath import clock
from authd.datapath.events import AuthRequiredEvent, DecodeError, FlowEvent, decode

log = structlog.get_logger(__name__)

BATCH = 1024

OnAuthRequired = Callable[[AuthRequiredEvent], None]
OnFlow = Callable[[FlowEvent], None]


class Ring(Protocol):
    """What the consumer needs from a ring buffer (:class:`~authd.datapath.ringbuf.RingBuffer`)."""

    def read(self, limit: int = ...) -> list[bytes]:
        """Consume up to ``limit`` records."""
        ...

    def drain(self) -> int:
        """Discard every pending record; return how many."""
        ...

    def fileno(self) -> int:
        """An fd that polls readable while records are pending."""
        ...


class EventConsumer:
    """Drains stale records on start, then dispatches new ones until cancelled."""

    def __init__(
        self, auth_ring: Ring, flow_ring: Ring, on_auth_required: OnAuthRequired, on_flow: OnFlow
    ) -> None:
        """Consume both rings (owned by the caller)."""
        self._rings = (auth_ring, flow_ring)
        self._on_auth_required = on_auth_required
        self._on_flow = on_flow
        self.decoded = 0
        self.malformed = 0
        self.stale = 0

    def drain_stale(self) -> int:
        """Discard records left from before this start (a pinned ring keeps them across restarts)."""
        dropped = sum(ring.drain() for ring in self._rings)
        self.stale += dropped
        if dropped:
            log.info("discarded stale datapath events", count=dropped)
        return dropped

    def poll(self) -> int:
        """Read and dispatch up to one batch of records from each ring; return the largest batch read."""
        most = 0
        for ring in self._rings:
            records = ring.read(BATCH)
            most = max(most, len(records))
            if records:
                self._dispatch(records)
        return most

    def _dispatch(self, records: list[bytes]) -> None:
        offset = clock.tai_offset_ns()
        for record in records:
            try:
                event = decode(record, offset)
            except DecodeError as err:
                self.malformed += 1
                if self.malformed == 1 or self.malformed % 1000 == 0:
                    log.warning("malformed datapath event skipped", error=str(err), total=self.malformed)
                continue
            self.decoded += 1
            if isinstance(event, FlowEvent):
                self._on_flow(event)
            else:
                self._on_auth_required(event)

    async def run(self, *, drain_stale: bool = True) -> None:
        """Dispatch records whenever a ring buffer's fd is readable."""
        if drain_stale:
            self.drain_stale()
        loop = asyncio.get_running_loop()
        readable = asyncio.Event()
        fds = [ring.fileno() for ring in self._rings]
        for fd in fds:
            loop.add_reader(fd, readable.set)
        try:
            while True:
                await readable.wait()
                readable.clear()
                # A busy ring must not starve the other jobs: yield between batches.
                while self.poll() == BATCH:  # noqa: ASYNC110 - polling is the point, sleep(0) only yields
                    await asyncio.sleep(0)
        finally:
            for fd in fds:
                loop.remove_reader(fd)
