"""The auth manager: keeps the datapath equal to policy x local SVIDs x attested remote identities.

Inputs, each of which only marks the state dirty: cluster state snapshots, SVID store events (local
SVIDs rotated, added, removed; bundles changed), attestation results, and "auth required" events from the
datapath. One reconcile loop then computes what the maps should hold and writes only the differences:

- ipcache and policy entries from cluster state (:mod:`authd.cluster.desired`);
- for every pair policy needs, ``(L, R, node) -> min(L.notAfter, R@node.notAfter)``, where R's expiry
  comes from the SVID this node holds when R runs here, else from the attestation of R at that node;
- deletions, read from the pinned map itself (never from a cache), of entries that are expired, no longer
  wanted by policy, or whose local SVID is gone. Until the sources have synced (cluster state loaded,
  the SVID store ready), nothing still wanted is deleted, and entries of remote pairs restored from the
  pinned map after a restart stay until their peer has been attested again (or their expiry): a restart
  leaves no gap.

A full reconcile does all of that and reads the pinned map; it runs on every change of cluster state or
local SVIDs, at the earliest expiry, on "auth required" for a pair whose attestation is valid (its entry
may have been removed behind authd's back), and at least every :data:`FULL_RECONCILE_INTERVAL`. An
attestation result that appears, changes or goes away only touches the pairs of that peer, compared
with what the last full reconcile read and what was written since: results arrive one remote identity
at a time, and a full pass for each would make converging on N remote identities cost O(N^2) (with
1000, it was most of the time to converge).

A full reconcile does not block the event loop: the desired-state computation, the map dump, the diff
over every pair and the bulk writes run in a worker thread (with 200k entries they take seconds of CPU).
Its inputs are snapshots taken on the loop, and only this manager's loop writes the auth map, waiting for
the worker before it does anything else, so writes stay ordered and nothing writes in between. A
worker thread still holds the GIL for whatever runs in C, so the pass makes no object per entry that
would live through it, and building a new plan freezes it out of the cyclic garbage collector
(:func:`_long_lived_objects`): a full collection over 200k pairs is one stall of ~200 ms.

Handshakes are the attestation schedule's business (one per remote identity and node); a local SVID
rotation only moves expiries.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Protocol

import structlog

from authd.attest.results import Attestation, Attestations, Peer, Target
from authd.cluster.desired import AuthPair, auth_pairs, ipcache, policy
from authd.cluster.model import ClusterState, IpNetwork
from authd.datapath import AuthType, IpcacheEntry, PolicyKey
from authd.errors import SpiffeIdError
from authd.identity import SpiffeId
from authd.x509svid import X509Svid

log = structlog.get_logger(__name__)

FULL_RECONCILE_INTERVAL = timedelta(seconds=60)
"""The longest time between two full reconciles (which read the pinned map), whatever else happens."""


class Handles(Protocol):
    """The node-local handle registry."""

    def identity_handle(self, spiffe_id: SpiffeId) -> int | None:
        """The handle of an identity, if assigned."""
        ...

    def node_handle(self, name: str) -> int | None:
        """The handle of a node (0 for this node), if assigned."""
        ...

    def identity_name(self, handle: int) -> str | None:
        """The SPIFFE ID behind a handle, if assigned."""
        ...

    def node_name(self, handle: int) -> str | None:
        """The node behind a node handle, if assigned."""
        ...

    @property
    def identities(self) -> Mapping[SpiffeId, int]:
        """Every assigned identity handle."""
        ...

    @property
    def nodes(self) -> Mapping[str, int]:
        """Every assigned remote node handle."""
        ...

    def release(self, identities: Iterable[SpiffeId] = (), nodes: Iterable[str] = ()) -> bool:
        """Free handles nothing refers to any more (persisted)."""
        ...

    def assign(self, identities: Iterable[SpiffeId] = (), nodes: Iterable[str] = ()) -> bool:
        """Give handles to what has none (persisted)."""
        ...


class AuthTable(Protocol):
    """The pinned auth map, in terms of pairs (the datapath adapter translates handles)."""

    def read(self) -> dict[AuthPair, datetime]:
        """Every entry whose handles resolve, read from the kernel; entries that do not are dropped."""
        ...

    def purge_unresolved(self) -> int:
        """Delete entries whose handles resolve to nothing; return how many."""
        ...

    def write(self, upserts: Mapping[AuthPair, datetime], deletes: Collection[AuthPair]) -> None:
        """Apply changes in batches."""
        ...


class DatapathTables(Protocol):
    """The pinned ipcache and policy maps."""

    def sync_ipcache(self, desired: Mapping[IpNetwork, IpcacheEntry]) -> int:
        """Make the ipcache equal to ``desired``; return how many entries changed."""
        ...

    def sync_policy(self, desired: Mapping[PolicyKey, AuthType]) -> int:
        """Make the policy map equal to ``desired``; return how many entries changed."""
        ...


class SvidView(Protocol):
    """What the manager reads from the SVID store."""

    def local_svids(self) -> Mapping[SpiffeId, X509Svid]:
        """SVIDs of the workloads on this node."""
        ...

    @property
    def synced(self) -> bool:
        """Whether the local SVIDs reflect SPIRE (the first update of every stream arrived)."""
        ...


@dataclass
class ManagerStats:
    """What reconciling did, for metrics and ``authd status``."""

    reconciles: int = 0
    peer_reconciles: int = 0
    upserts: int = 0
    deletes: int = 0
    table_changes: int = 0
    auth_required: Counter[str] = field(default_factory=Counter)
    entries: int = 0


class AuthManager:
    """Reconciles the datapath maps with cluster state, SVIDs and attestations."""

    def __init__(
        self,
        *,
        node_name: str,
        handles: Handles,
        table: AuthTable,
        tables: DatapathTables,
        svids: SvidView,
        attestations: Attestations,
        attest_port: int,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        """Wire the manager; nothing is read or written before :meth:`run`."""
        self._node = node_name
        self._handles = handles
        self._table = table
        self._tables = tables
        self._svids = svids
        self._attestations = attestations
        self._attest_port = attest_port
        self._now = now
        self._state: ClusterState | None = None
        # Per desired version (``_version``): the pairs on this node, and the pairs of each peer whose
        # attestation they need. Nothing else of the desired state is held: the ipcache and policy
        # entries are computed again when the tables are synced (once per version, or on a resync).
        self._version: str | None = None
        self._local_pairs: frozenset[AuthPair] = frozenset()
        self._pairs_of: dict[Peer, tuple[AuthPair, ...]] = {}
        self._tables_version = ""
        self._dirty = asyncio.Event()
        self._full = True  # the next pass must be a full reconcile (else only _changed_peers)
        self._changed_peers: set[Peer] = set()
        # What the auth map holds, as of the last full reconcile (which reads it) and the writes since.
        self._mirror: dict[AuthPair, datetime] = {}
        self._next_expiry: datetime | None = None
        self.full_interval = FULL_RECONCILE_INTERVAL
        """The longest time between two full reconciles."""
        self._last_full = now()
        self.stats = ManagerStats()

    # --------------------------------------------------------------------------------------- inputs

    def cluster_changed(self, state: ClusterState) -> None:
        """A new cluster state is in force."""
        self._state = state
        self._mark()

    def svids_changed(self) -> None:
        """Local SVIDs were added, rotated or removed."""
        self._mark()

    def attestations_changed(self, peers: Collection[Peer]) -> None:
        """The attestation results of ``peers`` appeared, changed or went away.

        Only their pairs are looked at again: results arrive one remote identity at a time, and a full
        reconcile per result would make converging on N remote identities cost O(N^2).
        """
        self._changed_peers.update(peers)
        self._dirty.set()

    def auth_required(self, local: int, remote: int, remote_node: int) -> None:
        """The datapath dropped traffic of a pair with no live entry: attest now if that can help."""
        local_id, remote_id = self._identity(local), self._identity(remote)
        node = self._handles.node_name(remote_node)
        if local_id is None or remote_id is None or node is None:
            self.stats.auth_required["unknown-identity"] += 1
            return
        if node == self._node:
            self.stats.auth_required["local"] += 1  # both SVIDs are here: only a reconcile can help
            self._mark()
        elif self._attestations.request(peer := Peer(remote_id, node)):
            self.stats.auth_required["attesting"] += 1
        elif self._attestations.result(peer) is not None:
            # A valid result exists, so the entry should too: if it went missing from the map (flushed
            # by hand, say), the reconcile, which reads the map, puts it back.
            self.stats.auth_required["known"] += 1
            self._mark()
        else:
            self.stats.auth_required["waiting"] += 1  # an attempt is under way or due shortly

    def _identity(self, handle: int) -> SpiffeId | None:
        name = self._handles.identity_name(handle)
        if name is None:
            return None
        try:
            return SpiffeId.parse(name)
        except SpiffeIdError:
            return None

    def _mark(self) -> None:
        self._full = True
        self._dirty.set()

    def fail_closed_at(self) -> datetime | None:
        """When the first entry in the auth map expires unless renewed; None while the map holds none.

        That is the moment traffic starts failing closed if no SVID is renewed from now on (SPIRE down).

        Read from the mirror of the map, at the time of asking (a scrape), not on every pass.
        """
        return min(self._mirror.values(), default=None)

    # ----------------------------------------------------------------------------------------- loop

    async def run(self) -> None:
        """Reconcile on every change and expiry, and fully at least every ``full_interval``; until cancelled.

        A full reconcile reads the pinned map, so entries that someone else added or removed are
        noticed even while nothing else happens.
        """
        while True:
            wake_at = self._last_full + self.full_interval
            if self._next_expiry is not None:
                wake_at = min(wake_at, self._next_expiry)
            timeout = max((wake_at - self._now()).total_seconds(), 0.0) + 0.001
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._dirty.wait(), timeout)
            self._dirty.clear()
            now = self._now()
            if now >= self._last_full + self.full_interval or (
                self._next_expiry is not None and self._next_expiry <= now
            ):
                self._full = True
            if self._full:
                await self.reconcile()
            else:
                self._reconcile_peers()

    async def reconcile(self) -> None:
        """Bring every map in line with the inputs, writing only differences (reads the auth map)."""
        self._last_full = self._now()
        state = self._state
        if state is None:
            return
        self._full = False
        self._changed_peers.clear()
        if self._version != state.version:
            with _long_lived_objects():
                await self._reconcile(state)
        else:
            await self._reconcile(state)
        self.stats.reconciles += 1

    async def _reconcile(self, state: ClusterState) -> None:
        await self._plan_version(state)
        if self._tables_version != state.version:
            changed = await asyncio.to_thread(self._sync_tables, state)
            self.stats.table_changes += changed
            self._tables_version = state.version
            if changed:
                log.info("datapath tables synced", version=state.version[:12], changed=changed)
        await self._write_auth()
        if self._svids.synced:
            await self._collect_garbage(state)

    def _sync_tables(self, state: ClusterState) -> int:
        """Compute the ipcache and policy entries of ``state`` and write their differences (worker)."""
        synced = self._tables.sync_ipcache(ipcache(state, self._node, self._handles))
        return synced + self._tables.sync_policy(policy(state, self._node, self._handles))

    async def _collect_garbage(self, state: ClusterState) -> None:
        """Delete entries no handle explains, then free the handles nothing uses any more.

        Runs only once the sources synced, after the ipcache and policy maps were made equal to cluster
        state: by then a handle of an identity or node that left cluster state is referenced at most by
        auth entries still in the map, and those keep it.
        """
        self.stats.deletes += await asyncio.to_thread(self._table.purge_unresolved)
        in_map_ids, in_map_nodes = await asyncio.to_thread(_referenced, self._mirror)
        known_ids, known_nodes = state.identities, state.nodes  # each built on every access
        identities = [i for i in self._handles.identities if i not in known_ids and i not in in_map_ids]
        nodes = [n for n in self._handles.nodes if n not in known_nodes and n not in in_map_nodes]
        if identities or nodes:
            self._handles.release(identities, nodes)
            log.info("identity handles released", identities=len(identities), nodes=len(nodes))

    def resync_tables(self) -> None:
        """Force the ipcache and policy maps to be compared again (their pins may have been touched)."""
        self._tables_version = ""
        self._mark()

    async def _plan_version(self, state: ClusterState) -> None:
        """Work out the pairs of a new cluster-state version (and what to attest), once per version.

        Not once per reconcile: reconciles follow every attestation result, and there are as many
        results as remote identities.
        """
        if self._version == state.version:
            return
        self._handles.assign(state.identities, state.nodes)
        local_pairs, pairs_of, targets = await asyncio.to_thread(self._plan_for, state)
        self._version, self._local_pairs, self._pairs_of = state.version, local_pairs, pairs_of
        self._attestations.want(targets)

    def _plan_for(
        self, state: ClusterState
    ) -> tuple[frozenset[AuthPair], dict[Peer, tuple[AuthPair, ...]], dict[Peer, Target]]:
        """The pairs of ``state`` on this node, those of each peer, and the attestation targets."""
        pairs = auth_pairs(state, self._node, self._handles)
        by_peer: dict[tuple[SpiffeId, str], list[AuthPair]] = {}  # one Peer per remote identity and node
        for pair in pairs:
            if not pair.on_local_node:
                by_peer.setdefault((pair.remote, pair.node), []).append(pair)
        pairs_of = {Peer(remote, node): tuple(held) for (remote, node), held in by_peer.items()}
        local_pairs = frozenset(pair for pair in pairs if pair.on_local_node)
        return local_pairs, pairs_of, self._targets(state, pairs_of)

    def _targets(self, state: ClusterState, peers: Iterable[Peer]) -> dict[Peer, Target]:
        targets: dict[Peer, Target] = {}
        for peer in peers:
            node = state.node(peer.node)
            if node is None:
                continue
            targets[peer] = Target(
                peer.remote_id,
                peer.node,
                node.spiffe_id,
                tuple(str(address) for address in node.addresses),
                node.attest_port or self._attest_port,
            )
        return targets

    def _plan(self) -> Iterator[tuple[AuthPair, Peer | None]]:
        """Every pair policy needs, with the peer whose attestation it needs (None on this node)."""
        for pair in self._local_pairs:
            yield pair, None
        for peer, pairs in self._pairs_of.items():
            for pair in pairs:
                yield pair, peer

    def _planned(self, pair: AuthPair) -> bool:
        """Whether policy needs ``pair`` in the current version."""
        if pair.on_local_node:
            return pair in self._local_pairs
        return pair in self._pairs_of.get(Peer(pair.remote, pair.node), ())

    async def _write_auth(self) -> None:
        now = self._now()
        local = dict(self._svids.local_svids())
        results = self._attestations.results()
        synced = self._svids.synced
        refused = frozenset(peer for peer in self._pairs_of if self._attestations.refused(peer))
        upserts, deletes, mirror, next_expiry = await asyncio.to_thread(
            self._full_pass, now, local, results, synced, refused.__contains__
        )
        if upserts or deletes:
            self.stats.upserts += len(upserts)
            self.stats.deletes += len(deletes)
            log.info("auth map updated", upserts=len(upserts), deletes=len(deletes), entries=len(mirror))
        self._mirror = mirror
        self.stats.entries = len(mirror)
        self._next_expiry = next_expiry

    def _full_pass(
        self,
        now: datetime,
        local: Mapping[SpiffeId, X509Svid],
        results: Mapping[Peer, Attestation],
        synced: bool,  # noqa: FBT001 - positional for asyncio.to_thread
        refused: Callable[[Peer], bool],
    ) -> tuple[dict[AuthPair, datetime], list[AuthPair], dict[AuthPair, datetime], datetime | None]:
        """Compute every wanted entry, read the map, write the differences (in a worker thread)."""
        wanted: dict[AuthPair, datetime] = {}
        for pair, peer in self._plan():
            expiry = self._expiry(pair, peer, local, results.get(peer) if peer is not None else None)
            if expiry is not None and expiry > now:
                wanted[pair] = expiry
        current = self._table.read()
        deletes: list[AuthPair] = []
        kept: dict[AuthPair, datetime] = {}
        for pair, expiry in current.items():
            if pair in wanted:
                continue
            if (
                expiry > now
                and self._planned(pair)
                and _keep_until_known(pair, local, synced=synced, refused=refused)
            ):
                kept[pair] = expiry
            else:
                deletes.append(pair)
        upserts = {pair: expiry for pair, expiry in wanted.items() if current.get(pair) != expiry}
        if upserts or deletes:
            self._table.write(upserts, deletes)
        mirror = {**kept, **wanted}
        return upserts, deletes, mirror, min(mirror.values()) if mirror else None

    def _reconcile_peers(self) -> None:
        """Bring the entries of the peers whose attestations changed in line, from the mirror."""
        peers, self._changed_peers = self._changed_peers, set()
        now = self._now()
        local = self._svids.local_svids()
        synced = self._svids.synced
        upserts: dict[AuthPair, datetime] = {}
        deletes: list[AuthPair] = []
        for peer in peers:
            result = self._attestations.result(peer)
            for pair in self._pairs_of.get(peer, ()):
                expiry = self._expiry(pair, peer, local, result)
                held = self._mirror.get(pair)
                if expiry is not None and expiry > now:
                    if held != expiry:
                        upserts[pair] = expiry
                elif held is not None and not (
                    held > now
                    and _keep_until_known(pair, local, synced=synced, refused=self._attestations.refused)
                ):
                    deletes.append(pair)
        if self._apply(upserts, deletes):
            for pair in deletes:
                del self._mirror[pair]
            self._mirror.update(upserts)
            log.debug(
                "auth map updated for peers", peers=len(peers), upserts=len(upserts), deletes=len(deletes)
            )
            if upserts:
                earliest = min(upserts.values())
                if self._next_expiry is None or earliest < self._next_expiry:
                    self._next_expiry = earliest
        self.stats.entries = len(self._mirror)
        self.stats.peer_reconciles += 1

    def _apply(self, upserts: Mapping[AuthPair, datetime], deletes: Collection[AuthPair]) -> bool:
        """Write changes to the auth map, if any; return whether there were any."""
        if not upserts and not deletes:
            return False
        self._table.write(upserts, deletes)
        self.stats.upserts += len(upserts)
        self.stats.deletes += len(deletes)
        return True

    @staticmethod
    def _expiry(
        pair: AuthPair,
        peer: Peer | None,
        local: Mapping[SpiffeId, X509Svid],
        result: Attestation | None,
    ) -> datetime | None:
        """min(L.notAfter, R.notAfter): R's SVID held here when ``peer`` is None, else its attestation."""
        mine = local.get(pair.local)
        if mine is None:
            return None
        if peer is None:
            theirs = local.get(pair.remote)
            return min(mine.not_after, theirs.not_after) if theirs is not None else None
        return min(mine.not_after, result.not_after) if result is not None else None


@contextlib.contextmanager
def _long_lived_objects() -> Iterator[None]:
    """Reconcile a new plan with the cyclic garbage collector paused, then keep what is alive out of it.

    A full collection walks every tracked object with the GIL held, so it stalls the event loop even
    while the work that set it off runs in a worker thread: with 200k auth pairs one takes about
    200 ms, and building a plan that big sets off several. So the collector is paused during the
    reconcile that builds a new plan, and everything alive afterwards is frozen (:func:`gc.freeze`):
    later collections skip it.
    Plans and pairs hold no reference cycles, so reference counting still frees a plan that a newer one
    replaces.

    Frozen objects are never collected while frozen, so whatever was alive at the last freeze and has
    since become cyclic garbage (old SVIDs, finished tasks, exceptions and their frames) would stay
    allocated for the life of the process. So the previous freeze is undone first, and one full
    collection reclaims all of that: one stall per cluster-state version, not one per rotation.
    """
    if not gc.isenabled():  # another manager's plan (tests, the bench) already paused it
        yield
        return
    gc.unfreeze()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        gc.enable()


def _referenced(entries: Collection[AuthPair]) -> tuple[set[SpiffeId], set[str]]:
    """The identities and nodes that auth entries refer to."""
    identities: set[SpiffeId] = set()
    nodes: set[str] = set()
    for pair in entries:
        identities.add(pair.local)
        identities.add(pair.remote)
        nodes.add(pair.node)
    return identities, nodes


def _keep_until_known(
    pair: AuthPair, local: Mapping[SpiffeId, X509Svid], *, synced: bool, refused: Callable[[Peer], bool]
) -> bool:
    """Whether an entry that cannot be computed now is kept until its expiry.

    Before the SVID store synced, the local SVIDs may simply not have arrived yet. A remote pair
    restored from the pinned map after a restart stays while its peer cannot be asked (unreachable,
    timeout) and its local SVID is held: the map is the state that survives restarts. It goes when
    the peer answers that it does not host the identity, or presents something that is not it.
    """
    if not synced:
        return True
    if pair.on_local_node or pair.local not in local:
        return False
    return not refused(Peer(pair.remote, pair.node))
