"""An etcd store for the etcd source's unit tests: scripted snapshots and watch outcomes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from authd.cluster.etcd import Change
from authd.errors import EtcdError


@dataclass
class FakeStore:
    """Each snapshot call pops ``snapshots``; each watch call pops ``watches``: batches to yield, then
    the error that ends the watch (None: the watch stays open, quiet, until cancelled)."""

    snapshots: list[tuple[int, dict[bytes, bytes]] | EtcdError] = field(default_factory=list)
    watches: list[tuple[list[list[Change]], EtcdError | None]] = field(default_factory=list)
    watched_from: list[int] = field(default_factory=list)
    closed: bool = False
    endpoint: str = "http://127.0.0.1:2379"

    async def snapshot(self, prefix: bytes) -> tuple[int, dict[bytes, bytes]]:
        del prefix
        outcome = self.snapshots.pop(0)
        if isinstance(outcome, EtcdError):
            raise outcome
        return outcome

    async def watch(self, prefix: bytes, start_revision: int) -> AsyncIterator[list[Change]]:
        del prefix
        self.watched_from.append(start_revision)
        batches, error = self.watches.pop(0)
        for batch in batches:
            yield batch
        if error is None:
            await asyncio.Event().wait()
        raise error or EtcdError("fake: the watch ended")

    async def close(self) -> None:
        self.closed = True
