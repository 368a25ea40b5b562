"""Node channels over loopback TLS 1.3: two real :class:`Channels` with certificates from an in-memory CA."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import itertools
import socket
import ssl
import time
from collections.abc import AsyncIterator, Callable, Collection
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from authd.attest import wire
from authd.attest._proto.channel_pb2 import Hello, Proof
from authd.attest.channels import STEADY_SESSION, Channels, bind, dials, policy_peers
from authd.attest.results import Attestations, Peer, Target
from authd.attest.tls import client_context, server_context
from authd.backoff import BackoffPolicy
from authd.cluster.model import ClusterState
from authd.config.model import AttestConfig
from authd.identity import SpiffeId
from authd.x509svid import BundleSet, PrivateKey
from tests.fakes.ca import LeafOptions, TestCA
from tests.fakes.cluster import endpoint, node, rule, sid, state
from tests.fakes.identities import FakeIdentities
from tests.waiting import eventually

NOW = dt.datetime.now(dt.UTC)
LIVE = LeafOptions(not_before=NOW - dt.timedelta(minutes=1), not_after=NOW + dt.timedelta(hours=1))
LATER = LeafOptions(not_before=NOW - dt.timedelta(minutes=1), not_after=NOW + dt.timedelta(hours=2))
WEB, DB, API = sid("web"), sid("db"), sid("api")
CONFIG = AttestConfig(handshake_timeout=dt.timedelta(seconds=1), client_timeout=dt.timedelta(seconds=1))
FAST = BackoffPolicy(initial=0.05, maximum=0.2, jitter=0)


def live_ca(trust_domain: str = "example.org") -> TestCA:
    return TestCA.create(
        trust_domain, not_before=NOW - dt.timedelta(days=1), not_after=NOW + dt.timedelta(days=1)
    )


@dataclass
class Changes:
    seen: list[Peer] = field(default_factory=list)

    def __call__(self, peers: Collection[Peer]) -> None:
        self.seen.extend(peers)


@dataclass
class Side:
    name: str
    identities: FakeIdentities
    results: Attestations
    channels: Channels
    changes: Changes
    port: int


def topology(port_a: int, port_b: int) -> ClusterState:
    """node-b's web talks to node-a's db and api; both nodes on loopback."""
    return state(
        [node("node-a", "127.0.0.1", attest_port=port_a), node("node-b", "127.0.0.2", attest_port=port_b)],
        [
            endpoint("db", "node-a", "10.1.0.5/32"),
            endpoint("api", "node-a", "10.1.0.6/32"),
            endpoint("web", "node-b", "10.2.0.5/32"),
        ],
        [rule(str(WEB), str(DB), "both"), rule(str(WEB), str(API), "both")],
    )


def targets(cluster: ClusterState, *remote: SpiffeId, at: str = "node-a") -> dict[Peer, Target]:
    where = cluster.node(at)
    assert where is not None
    return {
        Peer(r, at): Target(r, at, where.spiffe_id, tuple(str(a) for a in where.addresses), 0) for r in remote
    }


@dataclass
class Pair:
    ca: TestCA
    a: Side
    b: Side
    cluster: ClusterState

    def set_cluster(self, cluster: ClusterState) -> None:
        self.cluster = cluster
        self.a.channels.cluster_changed(cluster)
        self.b.channels.cluster_changed(cluster)


@contextlib.asynccontextmanager
async def pair(
    config: AttestConfig = CONFIG,
    backoff: BackoffPolicy = FAST,
    clock: Callable[[], float] = time.monotonic,
) -> AsyncIterator[Pair]:
    ca = live_ca()
    bundles = BundleSet.of([ca.bundle()])
    socks = {name: bind(address, 0) for name, address in (("node-a", "127.0.0.1"), ("node-b", "127.0.0.2"))}
    ports = {name: sock.getsockname()[1] for name, sock in socks.items()}
    cluster = topology(ports["node-a"], ports["node-b"])
    sides = {}
    tasks = []
    for name in ("node-a", "node-b"):
        identities = FakeIdentities(ca.mint(str(sid(f"authd/{name}")), LIVE), trusted=bundles)
        changes = Changes()
        results = Attestations(on_change=changes)
        channels = Channels(name, identities, results, config, backoff, clock=clock)
        results.ask_through(channels)
        channels.cluster_changed(cluster)
        sides[name] = Side(name, identities, results, channels, changes, ports[name])
        tasks += [asyncio.create_task(channels.run()), asyncio.create_task(channels.serve(socks[name]))]
    sides["node-a"].identities.host(ca.mint(str(DB), LIVE))
    try:
        yield Pair(ca, sides["node-a"], sides["node-b"], cluster)
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for sock in socks.values():
            sock.close()


def test_both_nodes_agree_on_the_channel_and_who_dials() -> None:
    cluster = topology(1, 2)
    assert policy_peers(cluster, "node-a") == {"node-b"}
    assert policy_peers(cluster, "node-b") == {"node-a"}
    a, b = sid("authd/node-a"), sid("authd/node-b")
    assert dials(a, b) != dials(b, a)


async def test_a_wanted_identity_is_proved_over_the_one_channel() -> None:
    async with pair() as p:
        p.b.results.want(targets(p.cluster, DB, API))
        await eventually(lambda: p.b.results.result(Peer(DB, "node-a")) is not None)
        await eventually(lambda: p.b.results.refused(Peer(API, "node-a")))
        result = p.b.results.result(Peer(DB, "node-a"))
        assert result is not None
        assert result.remote_id == DB
        assert p.a.channels.sessions() == {"node-b": True}
        assert p.b.channels.sessions() == {"node-a": True}
        opened = p.a.channels.stats.opened + p.b.channels.stats.opened
        assert opened == {"dialed": 1, "accepted": 1}


async def test_rotation_and_withdrawal_are_pushed() -> None:
    async with pair() as p:
        p.b.results.want(targets(p.cluster, DB))
        await eventually(lambda: p.b.results.result(Peer(DB, "node-a")) is not None)
        rotated = p.ca.mint(str(DB), LATER)
        p.a.identities.host(rotated)
        p.a.channels.local_changed(DB)
        await eventually(
            lambda: (
                (r := p.b.results.result(Peer(DB, "node-a"))) is not None and r.not_after == rotated.not_after
            )
        )
        del p.a.identities.local[DB]
        p.a.channels.local_changed(DB)
        await eventually(lambda: p.b.results.refused(Peer(DB, "node-a")))
        assert p.b.results.result(Peer(DB, "node-a")) is None


async def test_not_hosted_yet_keeps_the_result_and_becomes_final_once_synced() -> None:
    async with pair() as p:
        p.b.results.want(targets(p.cluster, DB))
        await eventually(lambda: p.b.results.result(Peer(DB, "node-a")) is not None)
        # node-a restarts: its SVIDs have not arrived yet.
        p.a.identities.synced = False
        del p.a.identities.local[DB]
        p.a.channels.own_rotated()
        await eventually(lambda: p.b.results.peers()[0].last_failure == "not-hosted-yet")
        assert p.b.results.result(Peer(DB, "node-a")) is not None
        p.a.identities.host(p.ca.mint(str(DB), LIVE))
        p.a.identities.synced = True
        p.a.channels.local_changed(DB)
        p.a.channels.local_synced()
        await eventually(lambda: p.b.results.peers()[0].last_failure == "")
        assert not p.b.results.refused(Peer(DB, "node-a"))


async def test_a_lost_channel_keeps_results_and_is_dialed_again() -> None:
    async with pair() as p:
        p.b.results.want(targets(p.cluster, DB))
        await eventually(lambda: p.b.results.result(Peer(DB, "node-a")) is not None)
        for side in (p.a, p.b):
            side.channels.own_rotated()
        await eventually(lambda: sum(p.a.channels.stats.opened.values()) >= 2)
        await eventually(lambda: p.b.channels.sessions() == {"node-a": True})
        assert p.b.results.result(Peer(DB, "node-a")) is not None


@pytest.mark.parametrize("rotated", ["node-a", "node-b"], ids=["dialer", "acceptor"])
async def test_a_rotated_node_svid_opens_the_next_session_before_the_current_one_closes(rotated: str) -> None:
    """Either node's SVID rotates: node-a (which dials) opens the next session at once, without waiting
    for its backoff, and closes the current one only once the next is up, so there is a session at
    every turn of the loop and none is counted as lost."""
    clock = [1000.0]
    slow = BackoffPolicy(initial=30, maximum=30, jitter=0)
    async with pair(backoff=slow, clock=lambda: clock[0]) as p:
        p.b.results.want(targets(p.cluster, DB))
        await eventually(lambda: p.b.results.result(Peer(DB, "node-a")) is not None)
        clock[0] += STEADY_SESSION
        up: list[bool] = []

        async def probe() -> None:
            while True:
                up.append(p.a.channels.sessions()["node-b"] and p.b.channels.sessions()["node-a"])
                await asyncio.sleep(0)

        probing = asyncio.create_task(probe())
        await asyncio.sleep(0)
        (p.a if rotated == "node-a" else p.b).channels.own_rotated()
        await eventually(lambda: sum(p.a.channels.stats.opened.values()) == 2)
        await eventually(lambda: sum(p.b.channels.stats.opened.values()) == 2)
        await asyncio.sleep(0.1)
        probing.cancel()
        assert all(up), f"no session at {up.count(False)} of {len(up)} turns"
        assert not p.a.channels.stats.ended
        assert p.b.results.result(Peer(DB, "node-a")) is not None


async def test_a_redial_asked_at_once_waits_and_a_peer_that_hangs_up_at_once_waits_the_backoff() -> None:
    """node-b asks for a new session right after this one began: node-a waits until the session has
    lasted STEADY_SESSION (no dial loop driven by the peer). node-b, not redialed within its handshake
    timeout, hangs up; the session was brief, so node-a dials again only after its backoff."""
    clock = [1000.0]
    slow = BackoffPolicy(initial=30, maximum=30, jitter=0)
    async with pair(backoff=slow, clock=lambda: clock[0]) as p:
        p.b.results.want(targets(p.cluster, DB))
        await eventually(lambda: p.b.results.result(Peer(DB, "node-a")) is not None)
        p.b.channels.own_rotated()
        await asyncio.sleep(0.5)
        assert sum(p.a.channels.stats.opened.values()) == 1
        assert p.a.channels.sessions() == {"node-b": True}
        await eventually(lambda: p.a.channels.sessions() == {"node-b": False})
        await asyncio.sleep(0.5)
        assert sum(p.a.channels.stats.opened.values()) == 1


async def test_bundle_change_revokes_at_once() -> None:
    async with pair() as p:
        p.b.results.want(targets(p.cluster, DB))
        await eventually(lambda: p.b.results.result(Peer(DB, "node-a")) is not None)
        other = live_ca()
        p.b.results.bundles_changed(BundleSet.of([other.bundle()]))
        assert p.b.results.result(Peer(DB, "node-a")) is None
        assert p.b.results.refused(Peer(DB, "node-a"))  # so the auth manager deletes its entries now
        assert Peer(DB, "node-a") in p.b.changes.seen


async def test_a_bundle_change_that_unverifies_the_peer_node_ends_its_channel() -> None:
    """A session authenticated its peer in its handshake: once the peer's node SVID no longer verifies
    (its trust domain's bundle went), the session ends at once on both sides, counted by rule."""
    async with pair() as p:
        p.b.results.want(targets(p.cluster, DB))
        await eventually(lambda: p.b.results.result(Peer(DB, "node-a")) is not None)
        unchanged = BundleSet.of([p.ca.bundle()])
        p.a.channels.bundles_changed(unchanged)
        assert p.a.channels.sessions() == {"node-b": True}
        p.b.channels.bundles_changed(BundleSet.of([live_ca().bundle()]))
        assert p.b.channels.sessions() == {"node-a": False}
        assert p.b.channels.stats.ended["peer-untrusted-chain"] == 1
        await eventually(lambda: p.a.channels.stats.ended["closed"] >= 1)


async def connect_as(
    svid_name: str, ca: TestCA, port: int, source: str = "127.0.0.2"
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A TLS client presenting an SVID named ``svid_name``, from ``source``."""
    svid = ca.mint(svid_name, LIVE)
    context = client_context(svid, BundleSet.of([ca.bundle()]))
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    await writer.start_tls(context)
    return reader, writer


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("spiffe://example.org/web", "client-unknown-node"),
        ("spiffe://example.org/authd/node-c", "client-unknown-node"),
        ("spiffe://example.org/authd/node-a", "client-unknown-node"),
    ],
)
async def test_a_client_that_is_not_a_peer_node_gets_no_hello(name: str, reason: str) -> None:
    async with pair() as p:
        reader, writer = await connect_as(name, p.ca, p.a.port)
        try:
            assert await reader.read() == b""  # closed, nothing sent
        finally:
            writer.close()
        assert p.a.channels.stats.refused[reason] == 1


@pytest.mark.parametrize(
    ("key", "reason"),
    [
        (
            lambda: rsa.generate_private_key(public_exponent=65537, key_size=1024),  # noqa: S505 - refused
            "client-leaf-key-rsa-size",
        ),
        (lambda: ec.generate_private_key(ec.SECP521R1()), "client-leaf-key-curve"),
    ],
    ids=["rsa-1024", "p-521"],
)
async def test_a_peer_nodes_client_svid_outside_the_key_policy_is_refused_by_its_rule(
    key: Callable[[], PrivateKey], reason: str, tmp_path: Path
) -> None:
    """node-b's own node SVID, signed by the trusted CA, with a leaf key the policy refuses: the listener
    refuses it with the same rule the dialer and the proof checks use, not a generic TLS failure."""
    async with pair() as p:
        svid = p.ca.mint(str(sid("authd/node-b")), replace(LIVE, key=key()))
        (tmp_path / "chain.pem").write_bytes(svid.chain_pem())
        (tmp_path / "key.pem").write_bytes(svid.key_pem())
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        context.minimum_version = ssl.TLSVersion.TLSv1_3
        context.set_ciphers("DEFAULT:@SECLEVEL=0")  # so that this client may present a weak key at all
        context.load_cert_chain(tmp_path / "chain.pem", tmp_path / "key.pem")
        reader, writer = await asyncio.open_connection("127.0.0.1", p.a.port, local_addr=("127.0.0.2", 0))
        try:
            with contextlib.suppress(ssl.SSLError, ConnectionError):
                await writer.start_tls(context)
                assert await reader.read() == b""  # closed, no hello
        finally:
            writer.close()
        await eventually(lambda: p.a.channels.stats.refused[reason] == 1)


async def test_sources_that_are_not_nodes_never_reach_tls() -> None:
    async with pair() as p:
        for _ in range(50):
            reader, writer = await asyncio.open_connection("127.0.0.1", p.a.port, local_addr=("127.0.0.9", 0))
            writer.write(b"\x16\x03\x01garbage")
            assert await reader.read() == b""
            writer.close()
        await eventually(lambda: p.a.channels.stats.refused["not-a-node"] == 50)


async def test_a_backlog_of_refused_connections_does_not_hold_the_event_loop() -> None:
    """A flood queues connections faster than they are refused. Each accept must give the loop back,
    else a full backlog is drained in one go while proofs and timers wait (issue 12's flood latency)."""
    queued = 300
    async with pair() as p:
        seen: list[int] = []
        refused = p.a.channels.stats.refused

        async def probe() -> None:
            while True:
                seen.append(refused["not-a-node"])
                await asyncio.sleep(0)

        probing = asyncio.create_task(probe())
        await asyncio.sleep(0)
        clients = []
        for _ in range(queued):  # the loop does not run meanwhile: every one waits in the backlog
            client = socket.socket()
            client.bind(("127.0.0.9", 0))
            client.connect(("127.0.0.1", p.a.port))
            clients.append(client)
        try:
            await eventually(lambda: refused["not-a-node"] == queued)
        finally:
            probing.cancel()
            for client in clients:
                client.close()
    steps = [after - before for before, after in itertools.pairwise(seen)]
    assert max(steps) <= 1, f"{max(steps)} connections refused in one turn of the loop"


async def test_a_malformed_proof_closes_the_channel_counted_and_it_is_dialed_again() -> None:
    """node-b's authd is hostile: it answers node-a's want with a proof nothing can parse."""
    ca = live_ca()
    bundles = BundleSet.of([ca.bundle()])
    hostile_sock = bind("127.0.0.2", 0)
    cluster = topology(0, hostile_sock.getsockname()[1])
    node_b = ca.mint(str(sid("authd/node-b")), LIVE)
    served = 0

    async def hostile(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal served
        served += 1
        writer.write(wire.encode(Hello(version=wire.VERSION, nonce=bytes(32))))
        await wire.read(reader)  # node-a's hello
        await wire.read(reader)  # its want
        writer.write(wire.encode(Proof(spiffe_id=str(WEB), chain=[b"\x30\x03\x02\x01\x01"], signature=b"x")))
        await writer.drain()
        await reader.read()
        writer.close()

    server = await asyncio.start_server(hostile, sock=hostile_sock, ssl=server_context(node_b, bundles))
    identities = FakeIdentities(ca.mint(str(sid("authd/node-a")), LIVE), trusted=bundles)
    results = Attestations(on_change=Changes())
    channels = Channels("node-a", identities, results, CONFIG, FAST)
    results.ask_through(channels)
    channels.cluster_changed(cluster)
    task = asyncio.create_task(channels.run())
    try:
        results.want(targets(cluster, WEB, at="node-b"))
        await eventually(lambda: channels.stats.ended["malformed-certificate"] >= 2)
        assert served >= 2  # dialed again after each close: nothing stalled or restarted
        assert not task.done()
        assert results.result(Peer(WEB, "node-b")) is None
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        server.close()


@pytest.mark.parametrize(
    ("presented", "reason"),
    [
        ("spiffe://example.org/authd/node-c", "server-unexpected-id"),  # another node
        ("spiffe://example.org/db", "server-unexpected-id"),  # a workload of node-b
    ],
)
async def test_the_dialer_refuses_a_server_that_is_not_the_peer_node(presented: str, reason: str) -> None:
    ca = live_ca()
    bundles = BundleSet.of([ca.bundle()])
    impostor_sock = bind("127.0.0.2", 0)
    cluster = topology(0, impostor_sock.getsockname()[1])

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()
        writer.close()

    server = await asyncio.start_server(
        silent, sock=impostor_sock, ssl=server_context(ca.mint(presented, LIVE), bundles)
    )
    identities = FakeIdentities(ca.mint(str(sid("authd/node-a")), LIVE), trusted=bundles)
    results = Attestations(on_change=Changes())
    channels = Channels("node-a", identities, results, CONFIG, FAST)
    results.ask_through(channels)
    channels.cluster_changed(cluster)
    task = asyncio.create_task(channels.run())
    try:
        results.want(targets(cluster, WEB, at="node-b"))
        await eventually(lambda: channels.stats.ended[reason] >= 1)
        assert not channels.stats.opened  # nothing was sent to it
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        server.close()
