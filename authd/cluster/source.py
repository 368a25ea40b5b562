"""Where cluster state comes from, as its consumers see it: the :class:`ClusterSource` interface.

The auth manager and the daemon's composition root depend on this interface only, so a distributed store
(etcd) can be added as another source without touching them. Every source keeps the last good state in
force when an update is bad, and publishes snapshots with latest-value semantics: a consumer that is busy
while several versions arrive sees only the newest, which is all that matters for a desired-state
reconciler and keeps memory bounded whatever the update rate.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol

from authd.cluster.model import ClusterState
from authd.identity import SpiffeId


class ClusterSource(Protocol):
    """A live view of cluster state."""

    def current(self) -> ClusterState | None:
        """The state in force: the last good one, or None before the first good one arrived."""
        ...

    def snapshots(self) -> AsyncIterator[ClusterState]:
        """Yield the state in force (once there is one), then each newer one; never ends by itself."""
        ...

    async def run(self) -> None:
        """Keep the state up to date until cancelled; the daemon runs this as a job."""
        ...


@dataclass(slots=True)
class SourceStats:
    """Counters of a cluster-state source, for the metrics endpoint.

    ``applied``: good versions that changed the state; ``unchanged``: changes seen that proved to be no-ops
    (a touch, an edit of comments); ``rejected``: bad versions refused; ``read_errors``: failures to read
    the source at all (missing or unreadable file); ``version``: digest of the state in force, "" if none;
    ``holds``: valid versions the deploy guard held back (:mod:`authd.cluster.guard`); ``held_reason`` and
    ``held_version``: the one held now, "" if none; etcd only: ``snapshots`` read, watched ``changes``
    applied, and ``out_of_touch_since``, the time (clock seconds) since which etcd cannot be reached, None
    while it can.
    """

    applied: int = 0
    unchanged: int = 0
    rejected: int = 0
    read_errors: int = 0
    holds: int = 0
    version: str = ""
    held_reason: str = ""
    held_version: str = ""
    snapshots: int = 0
    changes: int = 0
    out_of_touch_since: float | None = None
    problems: list[str] = field(default_factory=list)


class StateFeed:
    """Holds the state in force and wakes every waiting consumer when it changes (latest value wins)."""

    def __init__(self) -> None:
        """Start without a state."""
        self._state: ClusterState | None = None
        self._changed = asyncio.Event()

    def current(self) -> ClusterState | None:
        """The state in force, or None."""
        return self._state

    def publish(self, state: ClusterState) -> None:
        """Make ``state`` the state in force and wake the consumers."""
        self._state = state
        # Each waiter holds the event it waited on; a fresh one is made for the next change.
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def snapshots(self) -> AsyncIterator[ClusterState]:
        """Yield the current state once there is one, then every newer one this consumer has not seen."""
        seen: ClusterState | None = None
        while True:
            changed = self._changed
            state = self._state
            if state is not None and state is not seen:
                seen = state
                yield state
            else:
                await changed.wait()


class LiveDirectory:
    """Node lookups against the state a source has in force at the moment of asking.

    Satisfies the attestation listener's ``NodeDirectory``: a node removed from cluster state stops being
    accepted as a client at once, with no restart.
    """

    def __init__(self, source: ClusterSource) -> None:
        """Look things up in ``source.current()``."""
        self._source = source

    def node_named_by(self, spiffe_id: SpiffeId) -> str | None:
        """The name of the node whose authd runs as ``spiffe_id``; None if unknown or no state yet."""
        state = self._source.current()
        node = state.node_by_id(spiffe_id) if state is not None else None
        return node.name if node is not None else None


def local_node_name(configured: str | None) -> str:
    """This node's name in cluster state: ``node.name`` if set, else the host name as the kernel has it.

    Host names are case-insensitive and node names lowercase, so the host name is lowercased; it is not
    shortened, since node names are often fully qualified.
    """
    if configured:
        return configured
    return socket.gethostname().lower()
