"""Attestation listener and client over loopback TLS 1.3, with real certificates from an in-memory CA."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import socket
import ssl
import tempfile
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from authd.attest.client import Attestation, Attestor, Target
from authd.attest.listener import Listener, bind
from authd.attest.protocol import NONCE_BYTES, node_proof
from authd.attest.tls import ContextCache, client_context
from authd.config.model import AttestConfig
from authd.errors import AttestError
from authd.identity import SpiffeId, sni_for
from authd.x509svid import BundleSet, X509Svid
from tests.fakes.ca import LeafOptions, TestCA
from tests.fakes.identities import FakeIdentities, FakeNodes
from tests.waiting import eventually

NOW = dt.datetime.now(dt.UTC)
LIVE = LeafOptions(not_before=NOW - dt.timedelta(minutes=1), not_after=NOW + dt.timedelta(hours=1))
TD = "example.org"
WEB = SpiffeId.parse(f"spiffe://{TD}/ns/app/sa/web")
DB = SpiffeId.parse(f"spiffe://{TD}/ns/app/sa/db")
NODE_A = SpiffeId.parse(f"spiffe://{TD}/authd/node-a")
NODE_B = SpiffeId.parse(f"spiffe://{TD}/authd/node-b")

Reply = Callable[[bytes], bytes]
"""What an impostor answers to the client's nonce."""

CONFIG = AttestConfig(
    handshake_timeout=dt.timedelta(seconds=0.5),
    client_timeout=dt.timedelta(seconds=2),
    per_source_rate=1000,
    per_source_burst=1000,
)


def live_ca(trust_domain: str) -> TestCA:
    return TestCA.create(
        trust_domain, not_before=NOW - dt.timedelta(days=1), not_after=NOW + dt.timedelta(days=1)
    )


@dataclass
class Cluster:
    ca: TestCA
    federated: TestCA
    node_a: FakeIdentities
    node_b: FakeIdentities
    listener: Listener
    port: int

    def attestor(self, identities: FakeIdentities | None = None) -> Attestor:
        return Attestor(identities or self.node_b, CONFIG)

    def target(self, spiffe_id: SpiffeId, port: int | None = None) -> Target:
        return Target(spiffe_id, "node-a", NODE_A, ("127.0.0.1",), port or self.port)


@contextlib.asynccontextmanager
async def serving(listener: Listener, address: str = "127.0.0.1") -> AsyncIterator[int]:
    sock = bind(address, 0)
    task = asyncio.create_task(listener.serve(sock))
    try:
        yield sock.getsockname()[1]
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        sock.close()


@pytest.fixture
async def cluster() -> AsyncIterator[Cluster]:
    ca, federated = live_ca(TD), live_ca("federated.org")
    bundles = BundleSet.of([ca.bundle(), federated.bundle()])
    node_a = FakeIdentities(ca.mint(str(NODE_A), LIVE), trusted=bundles)
    node_a.host(ca.mint(str(WEB), LIVE))
    node_b = FakeIdentities(ca.mint(str(NODE_B), LIVE), trusted=bundles)
    listener = Listener(node_a, FakeNodes({NODE_B: "node-b"}), CONFIG)
    async with serving(listener) as port:
        yield Cluster(ca, federated, node_a, node_b, listener, port)


async def refusal(cluster: Cluster, reason: str) -> None:
    await eventually(lambda: cluster.listener.stats.refused[reason] >= 1)


async def test_attests_a_hosted_identity(cluster: Cluster) -> None:
    result = await cluster.attestor().attest(cluster.target(WEB))
    assert isinstance(result, Attestation)
    assert result.remote_id == WEB
    assert result.node == "node-a"
    assert result.not_after == cluster.node_a.local[WEB].not_after
    assert cluster.listener.stats.served == 1
    assert not cluster.listener.stats.refused


async def test_refuses_sni_of_an_identity_not_hosted(cluster: Cluster) -> None:
    with pytest.raises(AttestError) as caught:
        await cluster.attestor().attest(cluster.target(DB))
    assert caught.value.reason == "not-hosted"
    await refusal(cluster, "unknown-sni")


async def raw_tls(port: int, context: ssl.SSLContext, server_name: str) -> bytes:
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=context, server_hostname=server_name
    )
    try:
        return await reader.read(100)
    finally:
        writer.close()


def bare_client_context() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


async def test_refuses_a_client_without_certificate(cluster: Cluster) -> None:
    with contextlib.suppress(ssl.SSLError, ConnectionError):
        assert await raw_tls(cluster.port, bare_client_context(), sni_for(WEB)) == b""
    await refusal(cluster, "no-client-certificate")
    assert cluster.listener.stats.served == 0


async def test_refuses_a_client_of_another_trust_domain(cluster: Cluster) -> None:
    stranger = live_ca("stranger.org")
    svid = stranger.mint("spiffe://stranger.org/authd/node-x", LIVE)
    context = client_context(svid, BundleSet.of([stranger.bundle(), cluster.ca.bundle()]))
    with contextlib.suppress(ssl.SSLError, ConnectionError):
        assert await raw_tls(cluster.port, context, sni_for(WEB)) == b""
    await refusal(cluster, "untrusted-client-certificate")


async def test_refuses_a_federated_ca_claiming_the_local_trust_domain(cluster: Cluster) -> None:
    forged = cluster.federated.mint(str(NODE_B), LIVE)
    with pytest.raises(AttestError) as caught:
        await cluster.attestor(FakeIdentities(forged, trusted=cluster.node_b.trusted)).attest(
            cluster.target(WEB)
        )
    assert caught.value.reason == "refused-by-peer"
    await refusal(cluster, "untrusted-chain")


async def test_refuses_a_client_that_is_not_a_known_node(cluster: Cluster) -> None:
    workload = cluster.ca.mint(str(DB), LIVE)
    with pytest.raises(AttestError) as caught:
        await cluster.attestor(FakeIdentities(workload, trusted=cluster.node_b.trusted)).attest(
            cluster.target(WEB)
        )
    assert caught.value.reason == "refused-by-peer"
    await refusal(cluster, "unknown-node")
    assert cluster.listener.stats.served == 0


async def test_hostile_connections_are_cut_while_legitimate_ones_proceed(cluster: Cluster) -> None:
    idle = await asyncio.open_connection("127.0.0.1", cluster.port)
    truncated = await asyncio.open_connection("127.0.0.1", cluster.port)
    truncated[1].write(bytes.fromhex("160301020001"))  # a TLS record header promising more than it sends
    garbage = await asyncio.open_connection("127.0.0.1", cluster.port)
    garbage[1].write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    started = asyncio.get_running_loop().time()
    result = await cluster.attestor().attest(cluster.target(WEB))
    assert result.remote_id == WEB
    assert asyncio.get_running_loop().time() - started < 0.5
    await refusal(cluster, "not-tls")
    await eventually(lambda: cluster.listener.stats.refused["deadline"] >= 2)
    for reader, writer in (idle, truncated, garbage):
        await asyncio.wait_for(reader.read(), 2)  # the listener closed it: read() reached EOF
        assert reader.at_eof()
        writer.close()


async def test_refuses_beyond_the_concurrency_cap() -> None:
    ca = live_ca(TD)
    node_a = FakeIdentities(ca.mint(str(NODE_A), LIVE), trusted=BundleSet.of([ca.bundle()]))
    config = AttestConfig(handshake_timeout=dt.timedelta(seconds=1), max_concurrent_handshakes=2)
    listener = Listener(node_a, FakeNodes(), config)
    async with serving(listener) as port:
        held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]
        await eventually(lambda: listener.stats.refused["overloaded"] == 1)
        for _reader, writer in held:
            writer.close()


async def test_rate_limits_one_source() -> None:
    ca = live_ca(TD)
    node_a = FakeIdentities(ca.mint(str(NODE_A), LIVE), trusted=BundleSet.of([ca.bundle()]))
    config = AttestConfig(handshake_timeout=dt.timedelta(seconds=1), per_source_rate=1, per_source_burst=2)
    listener = Listener(node_a, FakeNodes(), config)
    async with serving(listener) as port:
        held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(4)]
        await eventually(lambda: listener.stats.refused["rate-limited"] == 2)
        for _reader, writer in held:
            writer.close()


# --------------------------------------------------------------------- the client refuses bad servers


@contextlib.asynccontextmanager
async def impostor(presented: X509Svid, reply: Reply | None = None) -> AsyncIterator[int]:
    """A TLS 1.3 server that presents ``presented`` whatever it is asked for, then answers the client's
    nonce with ``reply(nonce)`` (nothing by default)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    with tempfile.TemporaryDirectory(prefix="authd-impostor-") as directory:
        chain, key = Path(directory) / "chain.pem", Path(directory) / "key.pem"
        chain.write_bytes(presented.chain_pem())
        key.write_bytes(presented.key_pem())
        context.load_cert_chain(chain, key)

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            nonce = await reader.readexactly(NONCE_BYTES)
            if reply is not None:
                writer.write(reply(nonce))
                await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0, ssl=context)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


def ca_as_leaf(ca: TestCA) -> X509Svid:
    return X509Svid(SpiffeId.parse(f"spiffe://{TD}/ca"), (ca.cert,), ca.key)


@pytest.mark.parametrize(
    ("presented", "reason"),
    [
        (lambda c: c.ca.mint(str(DB), LIVE), "unexpected-id"),
        (lambda c: c.federated.mint(str(WEB), LIVE), "untrusted-chain"),
        (
            lambda c: c.ca.mint(
                str(WEB),
                LeafOptions(not_before=NOW - dt.timedelta(hours=2), not_after=NOW - dt.timedelta(hours=1)),
            ),
            "expired",
        ),
        (
            lambda c: c.ca.mint(
                str(WEB),
                LeafOptions(
                    ca=True, key_cert_sign=True, not_before=LIVE.not_before, not_after=LIVE.not_after
                ),
            ),
            "leaf-ca",
        ),
        (lambda c: ca_as_leaf(c.ca), "root-path"),
        (lambda _c: live_ca("stranger.org").mint("spiffe://stranger.org/x", LIVE), "unknown-trust-domain"),
    ],
    ids=["other-identity", "federated-ca-claims-local", "expired", "ca-leaf", "ca-certificate", "unknown-td"],
)
async def test_client_refuses_a_server_presenting(
    cluster: Cluster, presented: Callable[[Cluster], X509Svid], reason: str
) -> None:
    async with impostor(presented(cluster)) as port:
        with pytest.raises(AttestError) as caught:
            await cluster.attestor().attest(cluster.target(WEB, port))
    assert caught.value.reason == reason


async def test_client_falls_back_to_the_next_address_in_order(cluster: Cluster) -> None:
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    dead_port = closed.getsockname()[1]
    closed.close()
    target = Target(WEB, "node-a", NODE_A, ("127.0.0.2", "127.0.0.1"), cluster.port)
    attestor = cluster.attestor()
    result = await attestor.attest(target)
    assert result.address == "127.0.0.1"
    with pytest.raises(AttestError) as caught:
        await attestor.attest(Target(WEB, "node-a", NODE_A, ("127.0.0.1",), dead_port))
    assert caught.value.reason == "unreachable"
    assert attestor.stats.results == {"ok": 1, "unreachable": 1}


async def test_the_rate_limit_counts_only_connections_that_serve_nothing() -> None:
    ca = live_ca(TD)
    bundles = BundleSet.of([ca.bundle()])
    node_a = FakeIdentities(ca.mint(str(NODE_A), LIVE), trusted=bundles)
    node_a.host(ca.mint(str(WEB), LIVE))
    node_b = FakeIdentities(ca.mint(str(NODE_B), LIVE), trusted=bundles)
    config = AttestConfig(handshake_timeout=dt.timedelta(seconds=1), per_source_rate=1, per_source_burst=3)
    listener = Listener(node_a, FakeNodes({NODE_B: "node-b"}), config)
    async with serving(listener) as port:
        attestor = Attestor(node_b, CONFIG)
        target = Target(WEB, "node-a", NODE_A, ("127.0.0.1",), port)
        # A peer node with many identities to attest is not throttled by its own successes...
        for _ in range(10):
            await attestor.attest(target)
        assert listener.stats.served == 10
        # ...while connections that serve nothing use the bucket up.
        held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(5)]
        await eventually(lambda: listener.stats.refused["rate-limited"] == 2)
        for _reader, writer in held:
            writer.close()


async def test_identities_hosted_later_are_served_and_those_gone_refused(cluster: Cluster) -> None:
    attestor = cluster.attestor()
    await attestor.attest(cluster.target(WEB))
    cluster.node_a.host(cluster.ca.mint(str(DB), LIVE))
    assert (await attestor.attest(cluster.target(DB))).remote_id == DB
    del cluster.node_a.local[WEB]
    with pytest.raises(AttestError) as caught:
        await attestor.attest(cluster.target(WEB))
    assert caught.value.reason == "not-hosted"
    assert cluster.listener.stats.served == 2


def own(cluster: Cluster) -> X509Svid:
    svid = cluster.node_a.own_svid()
    assert svid is not None
    return svid


def proof_by(node: X509Svid, leaf: X509Svid, *, signed_nonce: bytes | None = None) -> Reply:
    """A node proof from ``node`` for ``leaf``, over the client's nonce or over ``signed_nonce``."""
    return lambda nonce: node_proof(node, signed_nonce or nonce, leaf.leaf)


REPLIES: dict[str, tuple[Callable[[Cluster], Reply | None], str]] = {
    "eof": (lambda _c: None, "refused-by-peer"),
    "cut": (lambda c: lambda n: proof_by(own(c), c.node_a.local[WEB])(n)[:30], "refused-by-peer"),
    "flood": (lambda _c: lambda _n: b"x" * 100_000, "bad-node-proof"),
    "garbage": (lambda _c: lambda _n: b"\0\0\0\x05{oops", "bad-node-proof"),
    "other-node": (
        lambda c: proof_by(c.ca.mint("spiffe://example.org/authd/node-c", LIVE), c.node_a.local[WEB]),
        "node-unexpected-id",
    ),
    "replayed": (
        lambda c: proof_by(own(c), c.node_a.local[WEB], signed_nonce=b"\1" * NONCE_BYTES),
        "node-signature",
    ),
    "other-leaf": (
        lambda c: proof_by(own(c), c.ca.mint(str(WEB), LIVE)),
        "node-signature",
    ),
}


@pytest.mark.parametrize("case", sorted(REPLIES))
async def test_client_refuses_a_server_without_a_valid_node_proof(cluster: Cluster, case: str) -> None:
    """A peer that proved R but is not node A, or cannot prove it for this session, is refused."""
    make_reply, reason = REPLIES[case]
    async with impostor(cluster.node_a.local[WEB], make_reply(cluster)) as port:
        with pytest.raises(AttestError) as caught:
            await cluster.attestor().attest(cluster.target(WEB, port))
    assert caught.value.reason == reason


async def test_a_listener_on_another_node_is_refused(cluster: Cluster) -> None:
    """node-c hosts web too, but the client asked node-a: node-c's honest listener is not node-a."""
    node_c = FakeIdentities(
        cluster.ca.mint("spiffe://example.org/authd/node-c", LIVE), trusted=cluster.node_a.trusted
    )
    node_c.host(cluster.node_a.local[WEB])
    listener = Listener(node_c, FakeNodes({NODE_B: "node-b"}), CONFIG)
    async with serving(listener) as port:
        with pytest.raises(AttestError) as caught:
            await cluster.attestor().attest(cluster.target(WEB, port))
    assert caught.value.reason == "node-unexpected-id"
    assert listener.stats.served == 1  # it served honestly; the client is the one that refuses


async def test_client_falls_back_when_an_address_does_not_answer_in_time(cluster: Cluster) -> None:
    """An address whose SYNs go unanswered costs one deadline, then the next address is asked."""
    stalled = socket.socket()
    queued: list[socket.socket] = []
    try:
        stalled.bind(("127.0.0.2", cluster.port))
        stalled.listen(0)
        for _ in range(3):  # fill the accept queue: later SYNs are dropped and connect() hangs
            extra = socket.socket()
            extra.settimeout(0)
            with contextlib.suppress(BlockingIOError):
                extra.connect(("127.0.0.2", cluster.port))
            queued.append(extra)
        config = AttestConfig(client_timeout=dt.timedelta(seconds=0.3))
        attestor = Attestor(cluster.node_b, config)
        target = Target(WEB, "node-a", NODE_A, ("127.0.0.2", "127.0.0.1"), cluster.port)
        result = await attestor.attest(target)
        assert result.address == "127.0.0.1"
    finally:
        for sock in (*queued, stalled):
            sock.close()


async def test_refusals_are_all_counted_and_logged_once_per_reason_and_interval(cluster: Cluster) -> None:
    with capture_logs() as logs:
        for _ in range(20):
            _reader, writer = await asyncio.open_connection("127.0.0.1", cluster.port)
            writer.write(b"GET / HTTP/1.1\r\n\r\n")
            writer.close()
        await eventually(lambda: cluster.listener.stats.refused["not-tls"] == 20)
    refusals = [entry for entry in logs if entry["event"] == "attestation refused"]
    assert [entry["reason"] for entry in refusals] == ["not-tls"]


def test_the_context_cache_drops_the_least_recently_used() -> None:
    ca = live_ca(TD)
    bundles = BundleSet.of([ca.bundle()])
    svids = [ca.mint(f"spiffe://{TD}/w{i}", LIVE) for i in range(4)]
    cache = ContextCache(max_entries=3)
    first = cache.get(svids[0], bundles, server=True)
    second = cache.get(svids[1], bundles, server=True)
    third = cache.get(svids[2], bundles, server=True)
    assert cache.get(svids[0], bundles, server=True) is first  # used again: now the most recent
    cache.get(svids[3], bundles, server=True)  # evicts svids[1], the least recently used
    assert len(cache) == 3
    assert cache.get(svids[0], bundles, server=True) is first
    assert cache.get(svids[2], bundles, server=True) is third
    assert cache.get(svids[1], bundles, server=True) is not second  # built again


def test_the_context_cache_holds_one_context_per_identity_across_rotations() -> None:
    # Keyed by leaf, it kept every rotated SVID's context (OpenSSL memory) until the size limit: the
    # daemon grew by about 130 KiB per rotation.
    ca = live_ca(TD)
    bundles = BundleSet.of([ca.bundle()])
    cache = ContextCache()
    contexts = []
    for _ in range(5):
        rotated = ca.mint(f"spiffe://{TD}/w", LIVE)
        contexts.append(cache.get(rotated, bundles, server=True))
        cache.get(rotated, bundles, server=False)
        assert len(cache) == 2  # the identity's server and client context, nothing of earlier leaves
    assert len({id(c) for c in contexts}) == 5  # each rotation got a context of its own leaf


def test_the_context_cache_follows_bundle_changes() -> None:
    ca, other = live_ca(TD), live_ca("federated.org")
    svid = ca.mint(f"spiffe://{TD}/w", LIVE)
    cache = ContextCache()
    before = cache.get(svid, BundleSet.of([ca.bundle()]), server=True)
    assert cache.get(svid, BundleSet.of([ca.bundle()]), server=True) is before  # same content, new object
    after = cache.get(svid, BundleSet.of([ca.bundle(), other.bundle()]), server=True)
    assert after is not before  # a trust domain more: the store of the context must change
