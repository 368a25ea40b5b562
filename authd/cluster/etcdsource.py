"""The distributed cluster-state source: the keys under a prefix in etcd (encoding: :mod:`.etcdcodec`).

:class:`EtcdClusterSource` reads a consistent snapshot of the prefix at one revision, then watches from
the next revision and applies each batch of changes to its copy of the keys. After the snapshot and after
the changes, the whole copy is decoded and validated as the file is; an invalid result is refused with
the keys at fault named, logged once and counted, and the last good state stays in force (the copy keeps
etcd's content, so the write that fixes it makes it valid again). A valid result passes the deploy guard
(:mod:`authd.cluster.guard`), so a wiped prefix is held back like an empty file.

Watched changes enter the copy as they arrive, and the copy is evaluated once the watch has been quiet
for a moment, or a bounded time after the first change waiting (:class:`Coalescing`): a burst of writes
costs a few evaluations, not one per write.

Fail static: when etcd cannot be reached, or the member loses its leader, the source keeps the state in
force, reports ``cluster`` degraded with how long it has been out of touch, retries with backoff against
the next member, and resumes watching from the revision after the last one it applied. Only a compacted
revision makes it read a fresh snapshot. "etcd down" never means "everything removed".
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

import structlog

from authd.backoff import Backoff, BackoffFactory
from authd.cluster.etcd import Change
from authd.cluster.etcdcodec import decode_state
from authd.cluster.guard import GuardedFeed
from authd.cluster.model import ClusterState
from authd.cluster.source import SourceStats
from authd.errors import ClusterStateError, EtcdCompactedError, EtcdError
from authd.health import Component

log = structlog.get_logger(__name__)

Sleep = Callable[[float], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Coalescing:
    """When watched changes are evaluated.

    Once the watch has been ``quiet`` for this many seconds, and at the latest ``longest`` seconds after
    the first change waiting.
    """

    quiet: float = 0.02
    longest: float = 0.5


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
        self.coalescing = Coalescing()
        """How watched changes are gathered before one evaluation."""
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
                await self._watch(backoff)
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

    async def _watch(self, backoff: Backoff) -> None:
        """Follow the watch from the revision after the copy's until it fails (EtcdError).

        Changes go into the copy as they arrive; the copy is evaluated once the watch has been quiet, and
        at the latest a bounded time after the first change not yet evaluated (:attr:`coalescing`).
        Changes taken are evaluated before the watch's failure propagates.
        """
        batches = aiter(self._store.watch(self._prefix, self.revision + 1))
        loop = asyncio.get_running_loop()
        due: float | None = None  # when the changes not yet evaluated must be, if there are any
        waiting: asyncio.Task[list[Change]] | None = None
        try:
            while True:
                if waiting is None:
                    waiting = asyncio.create_task(_next_batch(batches))
                if due is not None:
                    left = due - loop.time()
                    done = (
                        (await asyncio.wait({waiting}, timeout=min(self.coalescing.quiet, left)))[0]
                        if left > 0
                        else ()
                    )
                    if not done:
                        due = None
                        self._evaluate()
                        continue
                changes = await waiting
                waiting = None
                backoff.reset()
                if self._take(changes) and due is None:
                    due = loop.time() + self.coalescing.longest
        finally:
            if waiting is not None:
                waiting.cancel()
                await asyncio.wait({waiting})
            if due is not None:
                self._evaluate()

    async def sync(self) -> None:
        """Read a fresh snapshot of the prefix and make it the copy (raise EtcdError if etcd cannot)."""
        revision, items = await self._store.snapshot(self._prefix)
        self._items = {key[len(self._prefix) :].decode(): value for key, value in items.items()}
        self.revision = revision
        self._in_touch()
        self.stats.snapshots += 1
        log.info("etcd snapshot read", prefix=self.prefix, revision=revision, keys=len(items))
        self._evaluate()

    def _take(self, changes: list[Change]) -> bool:
        """Apply one batch of watched changes to the copy; return whether there were any.

        An empty batch says the watch is (re-)established: in touch again, nothing changed.
        """
        self._in_touch()
        for change in changes:
            key = change.key[len(self._prefix) :].decode()
            if change.value is None:
                self._items.pop(key, None)
            else:
                self._items[key] = change.value
            self.revision = max(self.revision, change.revision)
        self.stats.changes += len(changes)
        self._report_health()
        return bool(changes)

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
            self._feed.note_held(self.stats)
            if outcome == "unchanged":
                self.stats.unchanged += 1
        self._report_health()

    def _published(self, state: ClusterState) -> None:
        self._feed.note_held(self.stats)
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
        since = self.stats.out_of_touch_since
        failure = (
            f"{self._failure} (out of touch for {int(self._clock() - since)}s)" if since is not None else ""
        )
        self._feed.report_health(
            self._health, self.stats.problems, failure=failure, in_force=f" at revision {self.revision}"
        )


async def _next_batch(batches: AsyncIterator[list[Change]]) -> list[Change]:
    return await anext(batches)


def items_under(prefix: str, items: Mapping[str, bytes]) -> dict[bytes, bytes]:
    """Keys relative to ``prefix`` (as :mod:`.etcdcodec` makes them) as full etcd keys."""
    return {(prefix + key).encode(): value for key, value in items.items()}
