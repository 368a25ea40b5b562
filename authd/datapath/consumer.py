"""The ring-buffer consumer: reads records as they arrive, decodes them and hands them on.

Auth-required events go to the callable the composition root passes (the auth manager, later); flow
events to the flow log. Neither may block: the consumer is the only reader of the ring, and while it waits
the kernel drops new events (counted as ringbuf_full).
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

    def __init__(self, ring: Ring, on_auth_required: OnAuthRequired, on_flow: OnFlow) -> None:
        """Consume ``ring`` (owned by the caller)."""
        self._ring = ring
        self._on_auth_required = on_auth_required
        self._on_flow = on_flow
        self.decoded = 0
        self.malformed = 0
        self.stale = 0

    def drain_stale(self) -> int:
        """Discard records left from before this start (a pinned ring keeps them across restarts)."""
        dropped = self._ring.drain()
        self.stale += dropped
        if dropped:
            log.info("discarded stale datapath events", count=dropped)
        return dropped

    def poll(self) -> int:
        """Read and dispatch up to one batch of records; return how many were read."""
        records = self._ring.read(BATCH)
        if not records:
            return 0
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
        return len(records)

    async def run(self, *, drain_stale: bool = True) -> None:
        """Dispatch records whenever the ring buffer's fd is readable."""
        if drain_stale:
            self.drain_stale()
        loop = asyncio.get_running_loop()
        readable = asyncio.Event()
        loop.add_reader(self._ring.fileno(), readable.set)
        try:
            while True:
                await readable.wait()
                readable.clear()
                # A busy ring must not starve the other jobs: yield between batches.
                while self.poll() == BATCH:  # noqa: ASYNC110 - polling is the point, sleep(0) only yields
                    await asyncio.sleep(0)
        finally:
            loop.remove_reader(self._ring.fileno())
