"""A hostile or broken agent: garbage on every stream never kills the clients or the store.

A scripted fake agent (tests/fakes/spire_agent.py) sends, one message at a time, everything that can be
wrong with a SPIRE update. After each, the store must still hold the last good state, have counted the
rejection under the rule broken, and go on applying the next good update.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from grpclib.const import Status

from authd.identity import Selector, SpiffeId, TrustDomain
from authd.spire._proto import delegatedidentity_pb2, types_pb2, workload_pb2
from authd.spire.agent import StreamBoard
from authd.spire.delegated import DelegatedIdentityClient
from authd.spire.endpoint import Endpoint
from authd.spire.workload import NodeIdentity, WorkloadApiClient
from authd.svids import EventKind, Subscription, SvidEvent, SvidStore
from authd.x509svid import X509Svid
from tests.fakes.backoff import CountingBackoff
from tests.fakes.ca import LeafOptions
from tests.fakes.ca import TestCA as FakeCA
from tests.fakes.spire_agent import DELEGATED_BUNDLES, DELEGATED_SVIDS, WORKLOAD_SVIDS, End, FakeSpireAgent
from tests.integration.devspire import short_dir

OWN = "spiffe://example.org/authd/node-a"
WEB = SpiffeId.parse("spiffe://example.org/web")
TD = TrustDomain("example.org")
SOON = dt.datetime.now(dt.UTC)


def der(svid: X509Svid) -> bytes:
    return b"".join(cert.public_bytes(serialization.Encoding.DER) for cert in svid.chain)


def key(svid: X509Svid) -> bytes:
    return svid.private_key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


EC_PUBLIC_KEY_OID = bytes.fromhex("06072a8648ce3d0201")  # id-ecPublicKey, 1.2.840.10045.2.1


def unknown_algorithm(data: bytes) -> bytes:
    """The same DER with id-ecPublicKey turned into an algorithm nobody supports (1.2.840.10045.2.127)."""
    at = data.index(EC_PUBLIC_KEY_OID) + len(EC_PUBLIC_KEY_OID) - 1
    return data[:at] + b"\x7f" + data[at + 1 :]


def _tlv(tag: int, content: bytes) -> bytes:
    length = len(content)
    if length < 0x80:
        return bytes([tag, length]) + content
    size = (length.bit_length() + 7) // 8
    return bytes([tag, 0x80 | size]) + length.to_bytes(size, "big") + content


def _children(data: bytes) -> list[bytes]:
    """The TLVs inside one DER constructed value (tag, length, content each)."""
    first = data[1]
    offset = 2 + (first & 0x7F if first & 0x80 else 0)
    parts = []
    while offset < len(data):
        length, header = data[offset + 1], 2
        if length & 0x80:
            size = length & 0x7F
            length, header = int.from_bytes(data[offset + 2 : offset + 2 + size], "big"), 2 + size
        parts.append(data[offset : offset + header + length])
        offset += header + length
    return parts


def duplicate_extension(certificate: bytes) -> bytes:
    """The certificate with its first extension repeated (the signature no longer matters)."""
    tbs, algorithm, signature = _children(certificate)
    *fields, wrapped = _children(tbs)
    (extensions,) = _children(wrapped)
    items = _children(extensions)
    new_tbs = _tlv(0x30, b"".join(fields) + _tlv(0xA3, _tlv(0x30, b"".join([*items, items[0]]))))
    return _tlv(0x30, new_tbs + algorithm + signature)


def real_time_leaf(issuer: FakeCA, spiffe_id: str, **overrides: object) -> X509Svid:
    """A leaf valid around the real clock (the clients check expiry against it)."""
    now = dt.datetime.now(dt.UTC)
    options = {
        "not_before": now - dt.timedelta(minutes=1),
        "not_after": now + dt.timedelta(hours=1),
        **overrides,
    }
    return issuer.mint(spiffe_id, LeafOptions(**options))  # type: ignore[arg-type]


def svid_response(
    svid: X509Svid,
    *,
    bundle: bytes,
    spiffe_id: str = OWN,
    federated: dict[str, bytes] | None = None,
    **fields: bytes,
) -> workload_pb2.X509SVIDResponse:
    item = workload_pb2.X509SVID(
        spiffe_id=spiffe_id,
        x509_svid=fields.get("x509_svid", der(svid)),
        x509_svid_key=fields.get("x509_svid_key", key(svid)),
        bundle=bundle,
    )
    return workload_pb2.X509SVIDResponse(svids=[item], federated_bundles=federated or {})


@pytest.fixture
async def agent() -> AsyncIterator[FakeSpireAgent]:
    with short_dir() as directory:
        fake = FakeSpireAgent(directory / "agent.sock")
        await fake.start()
        try:
            yield fake
        finally:
            await fake.stop()


@contextlib.asynccontextmanager
async def running(
    coroutine_factory: Callable[[], Coroutine[Any, Any, None]],
) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(coroutine_factory())
    try:
        yield task
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def next_change(events: Subscription) -> SvidEvent:
    """The next change to an SVID or bundle (the one-time SYNCED signal is not a change)."""
    async with asyncio.timeout(10):
        while (event := await events.get()).kind is EventKind.SYNCED:
            pass
        return event


async def test_workload_api_garbage_is_rejected_and_last_good_svid_kept(agent: FakeSpireAgent) -> None:
    ca = FakeCA.create("example.org")
    other_ca = FakeCA.create("example.org")
    bundle = ca.bundle().der()
    store = SvidStore()
    client = WorkloadApiClient(
        Endpoint.unix(agent.path),
        store,
        node=NodeIdentity("node-a"),
        backoff=CountingBackoff(),
        status=StreamBoard(lambda: None),
    )
    stranger = real_time_leaf(ca, "spiffe://example.org/stranger")
    good = real_time_leaf(ca, OWN)
    garbage = [
        ("empty-svids", workload_pb2.X509SVIDResponse()),
        ("malformed-certificate", svid_response(good, bundle=bundle, x509_svid=b"\x30\x03abc")),
        ("malformed-certificate", svid_response(good, bundle=bundle, x509_svid=b"not DER at all")),
        ("empty-chain", svid_response(good, bundle=bundle, x509_svid=b"")),
        ("malformed-key", svid_response(good, bundle=bundle, x509_svid_key=b"\x30\x00")),
        ("malformed-key", svid_response(good, bundle=bundle, x509_svid_key=unknown_algorithm(key(good)))),
        ("malformed-key", svid_response(good, bundle=bundle, x509_svid=unknown_algorithm(der(good)))),
        (
            "malformed-certificate",
            svid_response(good, bundle=bundle, x509_svid=duplicate_extension(der(good))),
        ),
        ("key-mismatch", svid_response(good, bundle=bundle, x509_svid_key=key(stranger))),
        ("spiffe-id-mismatch", svid_response(stranger, bundle=bundle)),
        ("spiffe-id", svid_response(good, bundle=bundle, spiffe_id="spiffe://Example.org/authd/node-a")),
        ("empty-bundle", svid_response(good, bundle=b"")),
        ("malformed-certificate", svid_response(good, bundle=b"\x30\x82\xff\xff")),
        ("untrusted-chain", svid_response(good, bundle=other_ca.bundle().der())),
        (
            "expired",
            svid_response(
                real_time_leaf(
                    ca, OWN, not_before=SOON - dt.timedelta(hours=1), not_after=SOON - dt.timedelta(seconds=5)
                ),
                bundle=bundle,
            ),
        ),
        ("leaf-ca", svid_response(real_time_leaf(ca, OWN, ca=True), bundle=bundle)),
        ("bundle-key", svid_response(good, bundle=bundle, federated={"spiffe://partner.org/path": bundle})),
        ("bundle-key", svid_response(good, bundle=bundle, federated={"Partner.org": bundle})),
        ("empty-bundle", svid_response(good, bundle=bundle, federated={"spiffe://partner.org": b""})),
    ]
    with store.subscribe() as events:
        async with running(client.run) as task:
            agent.queue(WORKLOAD_SVIDS, svid_response(good, bundle=bundle))
            assert (await next_change(events)).kind is EventKind.ADDED
            assert (await next_change(events)).kind is EventKind.BUNDLE_CHANGED
            assert agent.metadata[0]["workload.spiffe.io"] == "true"
            held = good
            for rule, message in garbage:
                rejected = store.stats.rejected["workload-api", rule]
                # Garbage, then a good rotation as a barrier: the next event must be that rotation,
                # so the garbage changed nothing, and it was counted under the rule it broke.
                barrier = real_time_leaf(ca, OWN)
                agent.queue(WORKLOAD_SVIDS, message, svid_response(barrier, bundle=bundle))
                event = await next_change(events)
                assert (event.kind, event.own) == (EventKind.ROTATED, True), rule
                own = store.own_svid()
                assert own is not None
                assert der(own) == der(barrier)
                assert store.stats.rejected["workload-api", rule] == rejected + 1, rule
                held = barrier
            # Bytes that are not even a protobuf message: counted and skipped, the stream goes on.
            barrier = real_time_leaf(ca, OWN)
            agent.queue(WORKLOAD_SVIDS, b"\xff\xff\xff\xff", svid_response(barrier, bundle=bundle))
            assert (await next_change(events)).kind is EventKind.ROTATED
            assert store.stats.rejected["workload-api", "undecodable"] == 1
            # The agent ends the stream with an error: the client reconnects and goes on.
            barrier = real_time_leaf(ca, OWN)
            agent.queue(
                WORKLOAD_SVIDS, End(Status.UNAVAILABLE, "restarting"), svid_response(barrier, bundle=bundle)
            )
            assert (await next_change(events)).kind is EventKind.ROTATED
            assert agent.opened[WORKLOAD_SVIDS] == 2
            assert held is not barrier
            assert not task.done()


async def test_a_response_without_the_node_id_redacts_the_held_node_svid(agent: FakeSpireAgent) -> None:
    ca = FakeCA.create("example.org")
    bundle = ca.bundle().der()
    store = SvidStore()
    client = WorkloadApiClient(
        Endpoint.unix(agent.path),
        store,
        node=NodeIdentity("node-a"),
        backoff=CountingBackoff(),
        status=StreamBoard(lambda: None),
    )
    with store.subscribe() as events:
        async with running(client.run) as task:
            agent.queue(WORKLOAD_SVIDS, svid_response(real_time_leaf(ca, OWN), bundle=bundle))
            assert (await next_change(events)).kind is EventKind.ADDED
            assert (await next_change(events)).kind is EventKind.BUNDLE_CHANGED
            node_b = "spiffe://example.org/authd/node-b"
            agent.queue(
                WORKLOAD_SVIDS, svid_response(real_time_leaf(ca, node_b), bundle=bundle, spiffe_id=node_b)
            )
            event = await next_change(events)
            assert (event.kind, event.own) == (EventKind.REMOVED, True)
            assert store.own_svid() is None
            assert store.stats.rejected["workload-api", "node-id-missing"] == 1
            assert not task.done()  # held once: the identity may come back, authd keeps running


def delegated(
    *items: delegatedidentity_pb2.X509SVIDWithKey,
) -> delegatedidentity_pb2.SubscribeToX509SVIDsResponse:
    return delegatedidentity_pb2.SubscribeToX509SVIDsResponse(x509_svids=list(items))


def item(
    svid: X509Svid,
    spiffe_id: SpiffeId = WEB,
    *,
    chain: list[bytes] | None = None,
    private_key: bytes | None = None,
) -> delegatedidentity_pb2.X509SVIDWithKey:
    return delegatedidentity_pb2.X509SVIDWithKey(
        x509_svid=types_pb2.X509SVID(
            cert_chain=chain
            if chain is not None
            else [c.public_bytes(serialization.Encoding.DER) for c in svid.chain],
            id=types_pb2.SPIFFEID(trust_domain=spiffe_id.trust_domain.name, path=spiffe_id.path),
        ),
        x509_svid_key=private_key if private_key is not None else key(svid),
    )


def bundles(**by_key: bytes) -> delegatedidentity_pb2.SubscribeToX509BundlesResponse:
    return delegatedidentity_pb2.SubscribeToX509BundlesResponse(ca_certificates=by_key)


async def test_delegated_garbage_is_rejected_and_last_good_state_kept(agent: FakeSpireAgent) -> None:
    ca = FakeCA.create("example.org")
    partner = FakeCA.create("partner.org")
    local = {"spiffe://example.org": ca.bundle().der()}
    with_partner = {**local, "partner.org": partner.bundle().der()}  # bare names are accepted too
    good = real_time_leaf(ca, str(WEB))
    store = SvidStore(needs_own=False)
    client = DelegatedIdentityClient(
        Endpoint.unix(agent.path), store, backoff=CountingBackoff(), status=StreamBoard(lambda: None)
    )
    client.set_workloads({WEB: [Selector("unix", "uid:1001")]})
    svid_garbage = [
        ("malformed-certificate", delegated(item(good, chain=[b"\x30\x03abc"]))),
        ("empty-chain", delegated(item(good, chain=[]))),
        ("key-mismatch", delegated(item(good, private_key=key(real_time_leaf(ca, str(WEB)))))),
        ("malformed-key", delegated(item(good, private_key=b"\x30\x00"))),
        ("malformed-key", delegated(item(good, private_key=unknown_algorithm(key(good))))),
        ("malformed-key", delegated(item(good, chain=[unknown_algorithm(der(good))]))),
        ("malformed-certificate", delegated(item(good, chain=[duplicate_extension(der(good))]))),
        ("spiffe-id-mismatch", delegated(item(real_time_leaf(ca, "spiffe://example.org/db"), WEB))),
        ("spiffe-id", delegated(item(good), delegatedidentity_pb2.X509SVIDWithKey())),
        (
            "expired",
            delegated(
                item(
                    real_time_leaf(
                        ca,
                        str(WEB),
                        not_before=SOON - dt.timedelta(hours=1),
                        not_after=SOON - dt.timedelta(seconds=5),
                    )
                )
            ),
        ),
    ]
    bundle_garbage = [
        ("bundle-key", {"spiffe://": ca.bundle().der()}),
        ("bundle-key", {"spiffe://example.org/x": ca.bundle().der()}),
        ("malformed-certificate", {"spiffe://example.org": b"\x30\x05hello"}),
        ("empty-bundle", {"spiffe://example.org": b""}),
        ("empty-bundles", {}),
        (
            "conflicting-bundles",
            {
                "example.org": ca.bundle().der(),
                "spiffe://example.org": FakeCA.create("example.org").bundle().der(),
            },
        ),
    ]
    with store.subscribe() as events:
        async with running(client.run) as task:
            agent.queue(DELEGATED_BUNDLES, bundles(**local))
            agent.queue(DELEGATED_SVIDS, delegated(item(good)))
            first = {(await next_change(events)).kind, (await next_change(events)).kind}
            assert first == {EventKind.ADDED, EventKind.BUNDLE_CHANGED}
            assert isinstance(
                agent.requests[0],
                delegatedidentity_pb2.SubscribeToX509BundlesRequest
                | delegatedidentity_pb2.SubscribeToX509SVIDsRequest,
            )

            for rule, message in svid_garbage:
                rejected = store.stats.rejected["delegated-identity-api", rule]
                barrier = real_time_leaf(ca, str(WEB))
                agent.queue(DELEGATED_SVIDS, message, delegated(item(barrier)))
                event = await next_change(events)
                assert (event.kind, event.spiffe_id) == (EventKind.ROTATED, WEB), rule
                current = store.svid_for(WEB)
                assert current is not None
                assert der(current) == der(barrier)
                assert store.stats.rejected["delegated-identity-api", rule] == rejected + 1, rule

            toggle = [with_partner, local]
            for index, (rule, certificates) in enumerate(bundle_garbage):
                rejected = store.stats.rejected["delegated-identity-api", rule]
                barrier_set = toggle[index % 2]
                agent.queue(DELEGATED_BUNDLES, bundles(**certificates), bundles(**barrier_set))
                event = await next_change(events)
                assert (event.kind, event.trust_domain) == (EventKind.BUNDLE_CHANGED, partner.trust_domain), (
                    rule
                )
                assert store.bundle_for(TD) == ca.bundle()
                assert store.stats.rejected["delegated-identity-api", rule] == rejected + 1, rule

            # Not protobuf at all: counted and skipped.
            barrier = real_time_leaf(ca, str(WEB))
            agent.queue(DELEGATED_SVIDS, b"\xff\xff\xff", delegated(item(barrier)))
            assert (await next_change(events)).kind is EventKind.ROTATED
            assert store.stats.rejected["delegated-identity-api", "undecodable"] == 1
            # The agent ends the stream abruptly, then answers good updates again: still alive.
            barrier = real_time_leaf(ca, str(WEB))
            agent.queue(DELEGATED_SVIDS, End(Status.INTERNAL, "boom"), delegated(item(barrier)))
            assert (await next_change(events)).kind is EventKind.ROTATED
            assert agent.opened[DELEGATED_SVIDS] == 2
            # An empty list is SPIRE saying it no longer issues the identity (not garbage): removed.
            agent.queue(DELEGATED_SVIDS, delegated())
            assert (await next_change(events)) == SvidEvent(EventKind.REMOVED, WEB)
            assert not task.done()
