"""The distributed cluster-state source: the keys under a prefix in etcd (encoding: :mod:`.etcdcodec`).

:class:`EtcdClusterSource` reads a consistent snapshot of the prefix at one revision, then watches from
the next revision and applies each batch of changes to its copy of the keys. After the snapshot and after
every batch, the whole copy is decoded and validated as the file is; an invalid result is refused with
the keys at fault named, logged once and counted, and the last good state stays in force (the copy keeps
etcd's content, so the write that fixes it makes it valid again). A valid result passes the deploy guard
(:mod:`authd.cluster.guard`), so a wiped prefix is held back like an empty file.

Fail static: when etcd cannot be reached, or the member loses its leader, the source keeps the state in
force, reports ``cluster`` degraded with how long it has been out of touch, retries with backoff against
the next member, and resumes watching from the revision after the last one it applied. Only a compacted
revision makes it read a fresh snapshot. "etcd down" never means "everything removed".
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Protocol

import structlog

from authd.backoff import BackoffFactory
from authd.cluster.etcd import Change
from authd.cluster.etcdcodec import decode_state
from authd.cluster.guard import GuardedFeed
from authd.cluster.model import ClusterState
from authd.cluster.source import SourceStats
from authd.errors import ClusterStateError, EtcdCompactedError, EtcdError
from authd.health import Component

log = structlog.get_logger(__name__)

Sleep = Callable[[float], Awaitable[None]]


class Store(Protocol):
    """What the source needs of etcd (:class:`~authd.cluster.etcd.EtcdClient`)."""

    @property
    def endpoint(self) -> str:
        """The member talked to now."""
        ...

    async def snapshot(self, prefix: bytes) -> tuple[int, dict[bytes, bytes]]:
        """The keys under ``prefix`` at one revision, and that revision."""
        ...

    def watch(self, prefix: bytes, start_revision: int) -> AsyncIterator[list[Change]]:
        """Changes under ``prefix`` from ``start_revision`` on."""
        ...

    async def close(self) -> None:
        """Release the connection."""
        ...


class EtcdClusterSource:
    """A :class:`~authd.cluster.source.ClusterSource` backed by the keys under a prefix in etcd."""

    def __init__(
        self,
        store: Store,
        prefix: str,
        local_node: str,
        health: Component,
        *,
        backoff: BackoffFactory,
        max_endpoint_removal: float = 1.0,
        sleep: Sleep = asyncio.sleep,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """Follow ``prefix`` in ``store``; ``local_node`` is this node's name, looked for in every version."""
        self.prefix = prefix
        self.local_node = local_node
        self.stats = SourceStats()
        self._store = store
        self._prefix = prefix.encode()
        self._health = health
        self._backoff = backoff
        self._sleep = sleep
        self._clock = clock
        self._feed = GuardedFeed(
            local_node, max_endpoint_removal=max_endpoint_removal, origin=f"etcd {prefix}"
        )
        self._items: dict[str, bytes] = {}
        self.revision = 0
        """The etcd revision the copy of the keys is at; 0 until the first snapshot."""
        self._failure = ""

    def current(self) -> ClusterState | None:
        """The state in force, or None before the first good version."""
        return self._feed.current()

    def snapshots(self) -> AsyncIterator[ClusterState]:
        """The state in force, then each newer one."""
        return self._feed.feed.snapshots()

    def accept(self) -> ClusterState:
        """Apply the state the deploy guard holds back; raise LookupError if none is."""
        state = self._feed.accept()
        self._published(state)
        self._report_health()
        return state

    async def run(self) -> None:
        """Snapshot, then watch, until cancelled; every failure is retried with backoff, never fatal."""
        try:
            await self._follow()
        finally:
            await self._store.close()

    async def _follow(self) -> None:
        backoff = self._backoff()
        while True:
            try:
                if self.revision == 0:
                    await self.sync()
                    backoff.reset()
                async for changes in self._store.watch(self._prefix, self.revision + 1):
                    self.apply(changes)
                    backoff.reset()
            except EtcdCompactedError as err:
                log.warning(
                    "etcd compacted the revision to resume from, reading a fresh snapshot",
                    revision=self.revision,
                    compact_revision=err.compact_revision,
                )
                self.revision = 0
            except EtcdError as err:
                self._lost(str(err))
                await self._sleep(backoff.next_delay())

    async def sync(self) -> None:
        """Read a fresh snapshot of the prefix and make it the copy (raise EtcdError if etcd cannot)."""
        revision, items = await self._store.snapshot(self._prefix)
        self._items = {key[len(self._prefix) :].decode(): value for key, value in items.items()}
        self.revision = revision
        self._in_touch()
        self.stats.snapshots += 1
        log.info("etcd snapshot read", prefix=self.prefix, revision=revision, keys=len(items))
        self._evaluate()

    def apply(self, changes: list[Change]) -> None:
        """Apply one batch of watched changes to the copy, then evaluate the result."""
        self._in_touch()
        for change in changes:
            key = change.key[len(self._prefix) :].decode()
            if change.value is None:
                self._items.pop(key, None)
            else:
                self._items[key] = change.value
            self.revision = max(self.revision, change.revision)
        self.stats.changes += len(changes)
        self._evaluate()

    def _evaluate(self) -> None:
        try:
            state = decode_state(self._items, origin=f"etcd {self.prefix}")
        except ClusterStateError as err:
            self._reject(err.problems or [str(err)])
            return
        self.stats.problems = []
        outcome = self._feed.offer(state)
        if outcome == "applied":
            self._published(state)
        else:
            self._note_held()
            if outcome == "unchanged":
                self.stats.unchanged += 1
        self._report_health()

    def _published(self, state: ClusterState) -> None:
        self._note_held()
        self.stats.applied += 1
        self.stats.version = state.version
        log.info(
            "cluster state applied",
            prefix=self.prefix,
            revision=self.revision,
            version=state.version[:12],
            nodes=len(state.nodes),
            endpoints=len(state.endpoints),
            rules=len(state.rules),
        )

    def _note_held(self) -> None:
        held = self._feed.held
        self.stats.holds = self._feed.holds
        self.stats.held_reason = held.reason if held else ""
        self.stats.held_version = held.state.version if held else ""

    def _reject(self, problems: list[str]) -> None:
        if problems != self.stats.problems:
            self.stats.rejected += 1
            current = self._feed.current()
            log.error(
                "cluster state rejected, keeping the last good state",
                prefix=self.prefix,
                revision=self.revision,
                problems=problems,
                kept_version=current.version[:12] if current else None,
            )
        self.stats.problems = list(problems)
        self._report_health()

    def _in_touch(self) -> None:
        if self._failure:
            log.info("etcd reachable again", endpoint=self._store.endpoint, revision=self.revision)
        self._failure = ""
        self.stats.out_of_touch_since = None

    def _lost(self, reason: str) -> None:
        if reason != self._failure:
            self.stats.read_errors += 1
            current = self._feed.current()
            log.error(
                "etcd unreachable, keeping the last good state",
                error=reason,
                revision=self.revision,
                kept_version=current.version[:12] if current else None,
            )
        self._failure = reason
        if self.stats.out_of_touch_since is None:
            self.stats.out_of_touch_since = self._clock()
        self._report_health()

    def _report_health(self) -> None:
        current = self._feed.current()
        kept = f"; keeping version {current.version[:12]}" if current else ""
        held = self._feed.held
        since = self.stats.out_of_touch_since
        if since is not None:
            age = int(self._clock() - since)
            self._health.degraded(f"{self._failure} (out of touch for {age}s){kept}")
        elif held is not None:
            self._health.degraded(
                f"etcd {self.prefix} version {held.state.version[:12]} held back: {held.reason}; "
                f"`authd cluster accept` applies it{kept}"
            )
        elif self.stats.problems:
            count = len(self.stats.problems)
            self._health.degraded(
                f"etcd {self.prefix} rejected ({count} problem(s), first: {self.stats.problems[0]}){kept}"
            )
        elif current is None:
            self._health.degraded(f"no cluster state read from etcd {self.prefix} yet")
        elif current.node(self.local_node) is None:
            self._health.degraded(f'this node "{self.local_node}" is not in cluster state in etcd')
        else:
            self._health.ready(f"version {current.version[:12]} at revision {self.revision}")


def items_under(prefix: str, items: Mapping[str, bytes]) -> dict[bytes, bytes]:
    """Keys relative to ``prefix`` (as :mod:`.etcdcodec` makes them) as full etcd keys."""
    return {(prefix + key).encode(): value for key, value in items.items()}
