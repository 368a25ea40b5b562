"""The SVID store: the latest X509-SVIDs and trust bundles authd holds, and events when they change.

What it holds:

* authd's own SVID (the node identity, from the Workload API);
* the SVIDs of local workloads, by SPIFFE ID (from the Delegated Identity API);
* one X.509 bundle per trust domain, never merged. Bundles arrive from two origins: the Workload API
  (authd's own trust domain plus those its entry federates with) and the Delegated Identity API (every
  bundle the agent tracks). The richer origin wins as soon as it has delivered once; both come from the
  same agent, so they agree wherever they overlap.

Writers are the SPIRE clients. They parse each message into domain objects and hand them over, or hand
over the refusal (:meth:`SvidStore.reject`): a bad update is counted in :class:`StoreStats`, logged at
a limited rate, and the last good state stays. Nothing a SPIRE message contains can raise out of the
store.

Readers use :meth:`own_svid`, :meth:`svid_for`, :meth:`local_svids`, :meth:`bundle_for` and
:meth:`bundles`, :attr:`synced` (the local SVIDs reflect SPIRE: every workload stream answered once, so
an absent SVID really is absent), and :meth:`subscribe` for events. A subscription is a bounded queue:
a consumer too slow to keep up loses the queued events and receives one :attr:`EventKind.RESYNC`
instead, after which it must re-read the state it cares about. Nothing ever blocks the writers.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import MappingProxyType, TracebackType
from typing import Self

import structlog
from cryptography.hazmat.primitives import serialization

from authd.errors import SvidError
from authd.identity import SpiffeId, TrustDomain
from authd.x509svid import BundleSet, X509Bundle, X509Svid

log = structlog.get_logger(__name__)

Clock = Callable[[], datetime]

DEFAULT_QUEUE = 1024
REJECT_LOG_INTERVAL = 10.0  # seconds between two logs of the same rejection (every one is counted)


class EventKind(enum.StrEnum):
    """What changed."""

    ADDED = "added"
    ROTATED = "rotated"
    REMOVED = "removed"
    BUNDLE_CHANGED = "bundle-changed"
    SYNCED = "synced"
    RESYNC = "resync"


@dataclass(frozen=True, slots=True)
class SvidEvent:
    """One change: an SVID (``spiffe_id``; ``own`` for authd's own) or a trust domain's bundle."""

    kind: EventKind
    spiffe_id: SpiffeId | None = None
    trust_domain: TrustDomain | None = None
    own: bool = False


class BundleOrigin(enum.IntEnum):
    """Where a bundle set came from; the higher origin wins once it has delivered."""

    WORKLOAD_API = 1
    DELEGATED_IDENTITY_API = 2


@dataclass
class StoreStats:
    """Counters the metrics endpoint exports: updates applied and rejected, redactions, dropped events."""

    applied: collections.Counter[str] = field(default_factory=collections.Counter)
    rejected: collections.Counter[tuple[str, str]] = field(default_factory=collections.Counter)
    redactions: int = 0
    events_dropped: int = 0


class Subscription:
    """A bounded queue of store events; iterate it, or :meth:`get` one at a time. Close when done."""

    def __init__(self, store: SvidStore, maxsize: int) -> None:
        """Only :meth:`SvidStore.subscribe` creates subscriptions."""
        self._store = store
        self._queue: asyncio.Queue[SvidEvent] = asyncio.Queue(maxsize)
        self._resync_pending = False
        self.dropped = 0

    def _offer(self, event: SvidEvent) -> int:
        """Queue ``event``; on overflow replace the backlog by one RESYNC. Return how many were dropped."""
        if self._resync_pending:  # the consumer re-reads everything anyway
            self.dropped += 1
            return 1
        try:
            self._queue.put_nowait(event)
        except asyncio.QueueFull:
            lost = self._queue.qsize() + 1
            while not self._queue.empty():
                self._queue.get_nowait()
            self._queue.put_nowait(SvidEvent(EventKind.RESYNC))
            self._resync_pending = True
            self.dropped += lost
            return lost
        return 0

    def _taken(self, event: SvidEvent) -> SvidEvent:
        if event.kind is EventKind.RESYNC:
            self._resync_pending = False
        return event

    async def get(self) -> SvidEvent:
        """Wait for the next event."""
        return self._taken(await self._queue.get())

    def get_nowait(self) -> SvidEvent | None:
        """The next event if one is queued."""
        try:
            return self._taken(self._queue.get_nowait())
        except asyncio.QueueEmpty:
            return None

    def __aiter__(self) -> Subscription:
        """Iterate events forever."""
        return self

    async def __anext__(self) -> SvidEvent:
        """The next event."""
        return await self.get()

    def close(self) -> None:
        """Stop receiving events."""
        self._store._unsubscribe(self)  # noqa: SLF001 - the store and its subscriptions are one unit

    def __enter__(self) -> Self:
        """Use as a context manager that closes on exit."""
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        """Close."""
        self.close()


class SvidStore:
    """The latest SVIDs and bundles, their readiness, and their change events."""

    def __init__(
        self,
        *,
        needs_own: bool = True,
        needs_bundles: bool = True,
        clock: Clock | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        """``needs_*``: what must have arrived once before the store is ready."""
        self._needs_own = needs_own
        self._needs_bundles = needs_bundles
        self._clock = clock or (lambda: datetime.now(UTC))
        self._own: X509Svid | None = None
        self._local: dict[SpiffeId, X509Svid] = {}
        self._bundles_by_origin: dict[BundleOrigin, dict[TrustDomain, X509Bundle]] = {}
        self._bundles = BundleSet({})
        self._subscriptions: list[Subscription] = []
        self._local_synced = False
        self._ready = asyncio.Event()
        self._monotonic = monotonic
        self._logged_at: dict[tuple[str, str], float] = {}
        self._log_suppressed: collections.Counter[tuple[str, str]] = collections.Counter()
        self.stats = StoreStats()

    # ------------------------------------------------------------------------------------------ reading

    def own_svid(self) -> X509Svid | None:
        """The node's own SVID, if held (None before the first one and after a redaction)."""
        return self._own

    def svid_for(self, spiffe_id: SpiffeId) -> X509Svid | None:
        """The SVID of a local workload, if held."""
        return self._local.get(spiffe_id)

    def local_svids(self) -> Mapping[SpiffeId, X509Svid]:
        """A snapshot of every local workload SVID held."""
        return MappingProxyType(dict(self._local))

    def bundle_for(self, trust_domain: TrustDomain) -> X509Bundle | None:
        """The bundle of ``trust_domain`` (a :class:`~authd.x509svid.BundleSource`)."""
        return self._bundles.bundle_for(trust_domain)

    def bundles(self) -> BundleSet:
        """Every bundle held, one per trust domain."""
        return self._bundles

    @property
    def ready(self) -> bool:
        """Whether everything the store needs is held right now."""
        own_ok = self._own is not None or not self._needs_own
        bundles_ok = bool(self._bundles.bundles) or not self._needs_bundles
        return own_ok and bundles_ok

    @property
    def synced(self) -> bool:
        """Whether the local SVIDs reflect SPIRE: ready, and every workload stream answered once."""
        return self.ready and self._local_synced

    async def wait_ready(self) -> None:
        """Return once the store has been ready (at once if it is)."""
        await self._ready.wait()

    def subscribe(self, maxsize: int = DEFAULT_QUEUE) -> Subscription:
        """Receive every later change as a :class:`SvidEvent` (see the module docstring on overflow)."""
        subscription = Subscription(self, maxsize)
        self._subscriptions.append(subscription)
        return subscription

    def _unsubscribe(self, subscription: Subscription) -> None:
        if subscription in self._subscriptions:
            self._subscriptions.remove(subscription)

    # ------------------------------------------------------------------------------------------ writing

    def reject(self, source: str, error: SvidError) -> None:
        """Count an update refused by its parser, and log it (once per source and rule per interval)."""
        key = (source, error.rule)
        self.stats.rejected[key] += 1
        now = self._monotonic()
        if now - self._logged_at.get(key, -REJECT_LOG_INTERVAL) < REJECT_LOG_INTERVAL:
            self._log_suppressed[key] += 1
            return
        self._logged_at[key] = now
        log.warning(
            "spire update rejected, keeping the last good state",
            source=source,
            rule=error.rule,
            error=str(error),
            suppressed=self._log_suppressed.pop(key, 0),
        )

    def set_own(self, svid: X509Svid, *, source: str = "workload-api") -> bool:
        """Hold ``svid`` as authd's own SVID; False (counted) if it is already expired."""
        if not self._fresh(svid, source):
            return False
        previous, self._own = self._own, svid
        self.stats.applied[source] += 1
        self._emit(list(_svid_events(previous, svid, own=True)))
        return True

    def redact_own(self, reason: str) -> None:
        """Stop using authd's own SVID: the agent no longer vouches for it (Workload API 5.2.1)."""
        if self._own is None:
            return
        previous, self._own = self._own, None
        self.stats.redactions += 1
        log.warning(
            "own SVID redacted by SPIRE, no longer used", spiffe_id=str(previous.spiffe_id), reason=reason
        )
        self._emit([SvidEvent(EventKind.REMOVED, previous.spiffe_id, own=True)])

    def set_local(
        self, spiffe_id: SpiffeId, svid: X509Svid, *, source: str = "delegated-identity-api"
    ) -> bool:
        """Hold ``svid`` for the local workload ``spiffe_id``; False (counted) if wrong ID or expired."""
        if svid.spiffe_id != spiffe_id:
            self.reject(
                source, SvidError("unexpected-id", f"got an SVID for {svid.spiffe_id}, want {spiffe_id}")
            )
            return False
        if not self._fresh(svid, source):
            return False
        previous = self._local.get(spiffe_id)
        self._local[spiffe_id] = svid
        self.stats.applied[source] += 1
        self._emit(list(_svid_events(previous, svid, own=False)))
        return True

    def set_local_synced(self, synced: bool) -> None:  # noqa: FBT001 - a state, not a mode switch
        """The delegated client says whether every workload stream has answered (or been refused) once."""
        became = synced and not self._local_synced
        self._local_synced = synced
        if became:
            self._emit([SvidEvent(EventKind.SYNCED)])

    def remove_local(self, spiffe_id: SpiffeId, reason: str) -> None:
        """Forget the SVID of ``spiffe_id`` (workload gone, or SPIRE no longer issues it)."""
        if self._local.pop(spiffe_id, None) is None:
            return
        log.info("workload SVID removed", spiffe_id=str(spiffe_id), reason=reason)
        self._emit([SvidEvent(EventKind.REMOVED, spiffe_id)])

    def set_bundles(self, origin: BundleOrigin, bundles: Mapping[TrustDomain, X509Bundle]) -> bool:
        """Replace the bundles from ``origin``; False (counted) when the set is unusable."""
        source = origin.name.lower().replace("_", "-")
        for trust_domain, bundle in bundles.items():
            if bundle.trust_domain != trust_domain or not bundle.authorities:
                self.reject(
                    source, SvidError("empty-bundle", f'bundle of "{trust_domain}" has no authorities')
                )
                return False
        self._bundles_by_origin[origin] = dict(bundles)
        self.stats.applied[source] += 1
        winner = max(self._bundles_by_origin)
        previous, current = self._bundles.bundles, self._bundles_by_origin[winner]
        self._bundles = BundleSet(MappingProxyType(dict(current)))
        changed = sorted(
            td
            for td in previous.keys() | current.keys()
            if _bundle_der(previous.get(td)) != _bundle_der(current.get(td))
        )
        if changed:
            log.info(
                "trust bundles changed",
                source=source,
                changed=[td.name for td in changed],
                removed=sorted(td.name for td in previous.keys() - current.keys()),
            )
        self._emit([SvidEvent(EventKind.BUNDLE_CHANGED, trust_domain=td) for td in changed])
        return True

    def _fresh(self, svid: X509Svid, source: str) -> bool:
        now = self._clock()
        if svid.not_after <= now:
            self.reject(
                source, SvidError("expired", f"SVID {svid.spiffe_id} expired at {svid.not_after.isoformat()}")
            )
            return False
        return True

    def _emit(self, events: list[SvidEvent]) -> None:
        if self.ready and not self._ready.is_set():
            log.info("SVID store ready", own=str(self._own.spiffe_id) if self._own else None)
            self._ready.set()
        for event in events:
            for subscription in self._subscriptions:
                self.stats.events_dropped += subscription._offer(event)  # noqa: SLF001


def _svid_events(previous: X509Svid | None, current: X509Svid, *, own: bool) -> Iterator[SvidEvent]:
    if previous is None:
        yield SvidEvent(EventKind.ADDED, current.spiffe_id, own=own)
    elif previous.spiffe_id != current.spiffe_id:
        yield SvidEvent(EventKind.REMOVED, previous.spiffe_id, own=own)
        yield SvidEvent(EventKind.ADDED, current.spiffe_id, own=own)
    elif _leaf_der(previous) != _leaf_der(current):
        yield SvidEvent(EventKind.ROTATED, current.spiffe_id, own=own)


def _leaf_der(svid: X509Svid) -> bytes:
    return svid.leaf.public_bytes(serialization.Encoding.DER)


def _bundle_der(bundle: X509Bundle | None) -> bytes | None:
    return None if bundle is None else bundle.der()
