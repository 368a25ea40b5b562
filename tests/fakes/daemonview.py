"""A daemon's worth of components for the metrics collector and the status report, with nothing running.

Real stats objects (they are plain data) filled by hand, a real SVID store fed SVIDs from the test CA, and
small stand-ins for the results, the channels and the stream board.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from ipaddress import ip_address, ip_network

from authd.attest.channels import ChannelStats
from authd.attest.results import Attestation, Peer, PeerStatus, ResultStats
from authd.authmanager import ManagerStats
from authd.cluster.source import SourceStats
from authd.daemonview import DaemonView
from authd.datapath.enforcement import DatapathSnapshot
from authd.datapath.layout import Direction
from authd.encryption.device import PeerSpec
from authd.encryption.device import PeerStatus as DevicePeer
from authd.encryption.keys import KeyPair
from authd.encryption.tunnel import PeerSnapshot, TunnelSnapshot, TunnelStats
from authd.health import Health
from authd.identity import SpiffeId, TrustDomain
from authd.ktls.support import KtlsStats
from authd.logbook import Entry
from authd.svids import BundleOrigin, SvidStore
from tests.fakes.ca import NOW
from tests.fakes.ca import TestCA as FakeCA

TD = TrustDomain("example.org")
OWN = SpiffeId.parse("spiffe://example.org/authd/node-a")
WEB = SpiffeId.parse("spiffe://example.org/ns/shop/sa/web")
DB = SpiffeId.parse("spiffe://example.org/ns/shop/sa/db")
API = SpiffeId.parse("spiffe://example.org/ns/shop/sa/api")


@dataclass
class FakeBoard:
    """The SPIRE stream board."""

    down: Mapping[str, str] = field(default_factory=dict)
    failures: Counter[str] = field(default_factory=Counter)


@dataclass
class FakeResults:
    """The attestation results: fixed peer statuses."""

    statuses: list[PeerStatus] = field(default_factory=list)
    stats: ResultStats = field(default_factory=ResultStats)

    def peers(self) -> list[PeerStatus]:
        return list(self.statuses)


@dataclass
class FakeChannels:
    """The node channels: their stats and which are up."""

    stats: ChannelStats
    up: dict[str, bool] = field(default_factory=dict)

    def sessions(self) -> dict[str, bool]:
        return dict(self.up)


@dataclass
class FakeClusterSource:
    """The cluster source's stats."""

    stats: SourceStats


@dataclass
class FakeKtlsGate:
    """The kTLS gate: its stats."""

    stats: KtlsStats


@dataclass
class FakeTunnel:
    """The encryption job: a fixed snapshot."""

    fixed: TunnelSnapshot

    def snapshot(self) -> TunnelSnapshot:
        return self.fixed


def tunnel_snapshot(at: float) -> TunnelSnapshot:
    """Userspace backend, a key 600 s old, node-b's peer (handshake 30 s ago), node-c without keys yet."""
    peer_key = KeyPair.generate().public
    spec = PeerSpec(peer_key, bytes(32), (ip_address("10.0.0.2"), 51820), (ip_network("10.1.2.0/24"),))
    device = DevicePeer(
        peer_key, "10.0.0.2:51820", spec.allowed_ips, at - 30, 1000, 2000, has_preshared_key=True
    )
    stats = TunnelStats()
    stats.rotations.update({"ok": 2})
    stats.refused.update({"duplicate-key": 1})
    return TunnelSnapshot(
        backend="userspace",
        interface="authd-wg0",
        listen_port=51820,
        public_key=KeyPair.generate().public,
        key_since=at - 600,
        generation=3,
        peers=(PeerSnapshot("node-b", spec, at - 300, at - 60, device),),
        without_peer=("node-c",),
        stats=stats,
        at=at,
    )


@dataclass
class Parts:
    """The pieces a test may change before reading the view again."""

    health: Health
    store: SvidStore
    board: FakeBoard
    channels: ChannelStats
    results: FakeResults
    cluster: SourceStats
    manager: ManagerStats
    snapshot: DatapathSnapshot
    ktls: KtlsStats
    recent: list[Entry]
    restarts: dict[str, int]


def build(ca: FakeCA) -> tuple[DaemonView, Parts]:
    """A view of a node holding its own SVID and WEB's, with DB at node-b attested and API refused."""
    health = Health()
    svids, datapath = health.register("svids"), health.register("datapath")
    svids.ready()
    datapath.degraded("attached to 0 interfaces")
    store = SvidStore(clock=lambda: NOW)
    store.set_own(ca.mint(str(OWN)))
    store.set_local(WEB, ca.mint(str(WEB)))
    store.set_bundles(BundleOrigin.DELEGATED_IDENTITY_API, {TD: ca.bundle()})
    db = ca.mint(str(DB))
    attested = Attestation(DB, "node-b", "10.0.0.2", db.chain, NOW)
    results = FakeResults(
        [
            PeerStatus(Peer(API, "node-b"), None, refused=True, last_failure="not-hosted", in_flight=False),
            PeerStatus(Peer(DB, "node-b"), attested, refused=False, last_failure="", in_flight=False),
        ]
    )
    results.stats.attempts.update({"ok": 3, "not-hosted": 2, "rotated": 1})
    channels = ChannelStats()
    for seconds in (0.002, 0.004, 0.03):
        channels.exchanged.proof_latency.observe(seconds)
    channels.exchanged.proofs_sent = 7
    channels.opened.update({"dialed": 1})
    channels.refused.update({"not-a-node": 1})
    cluster = SourceStats(applied=2, rejected=1, version="ab" * 32, problems=["node[2].name: bad"])
    manager = ManagerStats(reconciles=4, upserts=3, deletes=1, entries=3)
    manager.auth_required.update({"attesting": 2})
    snapshot = DatapathSnapshot(
        counters={
            "allowed": 5,
            "allowed_auth": 9,
            "denied_auth_required": 4,
            "auth_events_lost": 1,
            "denied_encryption_unavailable": 6,
        },
        verdicts={
            ("allowed", Direction.EGRESS): 5,
            ("allowed_auth", Direction.INGRESS): 9,
            ("denied_auth_required", Direction.INGRESS): 3,
            ("denied_auth_required", Direction.EGRESS): 1,
            ("denied_encryption_unavailable", Direction.INGRESS): 6,
        },
        auth_capacity=1024,
        interfaces=("lxc0", "lxc1"),
        events_decoded=12,
        events_malformed=0,
        attach_mode="tcx",
        ahead={"lxc1 (ifindex 7)": ("ingress prog 42 (other_cni)",)},
        reassertions=1,
    )
    parts = Parts(
        health=health,
        store=store,
        board=FakeBoard({"delegated-svids[unix:uid:1000]": "UNAVAILABLE"}, Counter({"delegated-svids": 3})),
        channels=channels,
        results=results,
        cluster=cluster,
        manager=manager,
        snapshot=snapshot,
        ktls=KtlsStats(kernel_tls=False, denied_rules=2),
        recent=[Entry("2026-11-25T12:00:00Z", "warning", "attestation failed", {"reason": "not-hosted"})],
        restarts={"http": 1},
    )
    view = DaemonView(
        node="node-a",
        health=health,
        svids=store,
        streams=parts.board,
        channels=FakeChannels(channels, {"node-b": True, "node-c": False}),
        attestations=results,
        cluster=FakeClusterSource(cluster),
        ktls=FakeKtlsGate(parts.ktls),
        tunnel=FakeTunnel(tunnel_snapshot(NOW.timestamp())),
        auth=lambda: parts.manager,
        fail_closed_at=lambda: NOW + timedelta(seconds=90),
        datapath=lambda: parts.snapshot,
        datapath_enabled=True,
        restarts=parts.restarts,
        recent=lambda: list(parts.recent),
        now=lambda: NOW,
    )
    return view, parts
