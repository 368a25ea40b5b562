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

Handshakes are the attestation schedule's business (one per remote identity and node); a local SVID
rotation only moves expiries.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol

import structlog

from authd.attest.client import Attestation, Target
from authd.attest.schedule import Attestations, Peer
from authd.cluster.desired import AuthPair, DesiredState, desired_state
from authd.cluster.model import ClusterState, IpNetwork
from authd.datapath import AuthType, IpcacheEntry, PolicyKey
from authd.errors import SpiffeIdError
from authd.identity import SpiffeId
from authd.x509svid import X509Svid

log = structlog.get_logger(__name__)


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

    def assign(self, identities: Iterable[SpiffeId] = (), nodes: Iterable[str] = ()) -> bool:
        """Give handles to what has none (persisted)."""
        ...


class AuthTable(Protocol):
    """The pinned auth map, in terms of pairs (the datapath adapter translates handles)."""

    def read(self) -> dict[AuthPair, datetime]:
        """Every entry whose handles resolve, read from the kernel; entries that do not are dropped."""
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
        self._desired: DesiredState | None = None
        self._tables_version = ""
        self._dirty = asyncio.Event()
        self._next_expiry: datetime | None = None
        self.stats = ManagerStats()

    # --------------------------------------------------------------------------------------- inputs

    def cluster_changed(self, state: ClusterState) -> None:
        """A new cluster state is in force."""
        self._state = state
        self._desired = None
        self._mark()

    def svids_changed(self) -> None:
        """Local SVIDs were added, rotated or removed."""
        self._mark()

    def attestations_changed(self) -> None:
        """An attestation result appeared, changed or went away."""
        self._mark()

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
        elif self._attestations.request(Peer(remote_id, node)):
            self.stats.auth_required["attesting"] += 1
        else:
            # A valid result exists or an attempt is under way; if the entry went missing from the
            # map (flushed by hand, say), the reconcile puts it back.
            self.stats.auth_required["known"] += 1
            self._mark()

    def _identity(self, handle: int) -> SpiffeId | None:
        name = self._handles.identity_name(handle)
        if name is None:
            return None
        try:
            return SpiffeId.parse(name)
        except SpiffeIdError:
            return None

    def _mark(self) -> None:
        self._dirty.set()

    # ----------------------------------------------------------------------------------------- loop

    async def run(self) -> None:
        """Reconcile whenever something changed, and when the earliest entry expires; until cancelled."""
        while True:
            timeout = None
            if self._next_expiry is not None:
                timeout = max((self._next_expiry - self._now()).total_seconds(), 0.0) + 0.001
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._dirty.wait(), timeout)
            self._dirty.clear()
            self.reconcile()

    def reconcile(self) -> None:
        """Bring every map in line with the inputs, writing only differences."""
        state = self._state
        if state is None:
            return
        desired = self._desired_state(state)
        if self._tables_version != desired.version:
            changed = self._tables.sync_ipcache(desired.ipcache) + self._tables.sync_policy(desired.policy)
            self.stats.table_changes += changed
            self._tables_version = desired.version
            if changed:
                log.info("datapath tables synced", version=desired.version[:12], changed=changed)
        self._attestations.want(self._peers(state, desired.pairs))
        self._write_auth(desired.pairs)
        self.stats.reconciles += 1

    def resync_tables(self) -> None:
        """Force the ipcache and policy maps to be compared again (their pins may have been touched)."""
        self._tables_version = ""
        self._mark()

    def _desired_state(self, state: ClusterState) -> DesiredState:
        if self._desired is None or self._desired.version != state.version:
            self._handles.assign(state.identities, state.nodes)
            self._desired = desired_state(state, self._node, self._handles)
        return self._desired

    def _peers(self, state: ClusterState, pairs: frozenset[AuthPair]) -> dict[Peer, Target]:
        peers: dict[Peer, Target] = {}
        for pair in pairs:
            if pair.on_local_node:
                continue
            node = state.node(pair.node)
            if node is None:
                continue
            port = node.attest_port or self._attest_port
            peers[Peer(pair.remote, pair.node)] = Target(
                pair.remote, pair.node, tuple(str(a) for a in node.addresses), port
            )
        return peers

    def _write_auth(self, pairs: frozenset[AuthPair]) -> None:
        now = self._now()
        local = self._svids.local_svids()
        results = self._attestations.results()
        wanted: dict[AuthPair, datetime] = {}
        for pair in pairs:
            expiry = self._expiry(pair, local, results)
            if expiry is not None and expiry > now:
                wanted[pair] = expiry
        current = self._table.read()
        synced = self._svids.synced
        deletes: list[AuthPair] = []
        kept: dict[AuthPair, datetime] = {}
        for pair, expiry in current.items():
            if pair in wanted:
                continue
            if expiry > now and pair in pairs and self._keep_until_known(pair, synced=synced):
                kept[pair] = expiry
            else:
                deletes.append(pair)
        upserts = {pair: expiry for pair, expiry in wanted.items() if current.get(pair) != expiry}
        if upserts or deletes:
            self._table.write(upserts, deletes)
            self.stats.upserts += len(upserts)
            self.stats.deletes += len(deletes)
            log.info(
                "auth map updated",
                upserts=len(upserts),
                deletes=len(deletes),
                entries=len(wanted) + len(kept),
            )
        self.stats.entries = len(wanted) + len(kept)
        expiries = [*wanted.values(), *kept.values()]
        self._next_expiry = min(expiries) if expiries else None

    @staticmethod
    def _expiry(
        pair: AuthPair, local: Mapping[SpiffeId, X509Svid], results: Mapping[Peer, Attestation]
    ) -> datetime | None:
        mine = local.get(pair.local)
        if mine is None:
            return None
        if pair.on_local_node:
            theirs = local.get(pair.remote)
            return min(mine.not_after, theirs.not_after) if theirs is not None else None
        result = results.get(Peer(pair.remote, pair.node))
        return min(mine.not_after, result.not_after) if result is not None else None

    def _keep_until_known(self, pair: AuthPair, *, synced: bool) -> bool:
        """Whether an entry that cannot be computed now is kept until its expiry.

        Before the SVID store synced, the local SVIDs may simply not have arrived yet. A remote pair
        restored from the pinned map after a restart stays while its peer cannot be asked (unreachable,
        timeout) and its local SVID is held: the map is the state that survives restarts. It goes when
        the peer answers that it does not host the identity, or presents something that is not it.
        """
        if not synced:
            return True
        if pair.on_local_node or pair.local not in self._svids.local_svids():
            return False
        return not self._attestations.refused(Peer(pair.remote, pair.node))
