"""The Delegated Identity API end to end: dev-spire's admin socket and authd's delegated client and store."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
from collections.abc import AsyncIterator, Coroutine
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives import serialization

from authd.backoff import BackoffPolicy, ExponentialBackoff
from authd.errors import SvidError
from authd.identity import Selector, SpiffeId, TrustDomain
from authd.spire._proto import delegatedidentity_pb2, types_pb2
from authd.spire.agent import StreamBoard
from authd.spire.delegated import SUBSCRIBE_X509_BUNDLES, SUBSCRIBE_X509_SVIDS, DelegatedIdentityClient
from authd.spire.dev.registry import agent_id
from authd.spire.dev.service import admin_socket, workload_socket
from authd.spire.dev.state import mint_svid
from authd.spire.entries import EntryClient, RegistrationEntry
from authd.svids import EventKind, SvidStore
from authd.x509svid import X509Svid, authorize_id, verify_chain
from tests.fakes.backoff import CountingBackoff
from tests.integration.devspire import (
    AUTHD_ID,
    ME,
    TD,
    DevSpireProcess,
    admin_endpoint,
    entry_socket,
    next_event,
    now,
    options,
    running,
    short_dir,
    until,
    write_entries,
)

PARENT = agent_id(TD, "node-a")
W1 = SpiffeId.parse("spiffe://example.org/ns/shop/web")
W2 = SpiffeId.parse("spiffe://example.org/ns/shop/db")
S1 = Selector("unix", "uid:1001")
S2 = Selector("unix", "uid:1002")
PARTNER = TrustDomain("partner.org")


class RecordingBackoff:
    """The real exponential backoff with short delays, recording what one retry loop asked of it."""

    def __init__(self, asked: asyncio.Event) -> None:
        self.inner = ExponentialBackoff(BackoffPolicy(initial=0.05, maximum=0.4))
        self.asked = asked
        self.delays: list[float] = []
        self.resets = 0

    def next_delay(self) -> float:
        delay = self.inner.next_delay()
        self.delays.append(delay)
        self.asked.set()
        return delay

    def reset(self) -> None:
        self.resets += 1
        self.inner.reset()


class RecordingBackoffs:
    """A backoff factory keeping every backoff it made (one per stream)."""

    def __init__(self) -> None:
        self.made: list[RecordingBackoff] = []
        self.asked = asyncio.Event()

    def __call__(self) -> RecordingBackoff:
        backoff = RecordingBackoff(self.asked)
        self.made.append(backoff)
        return backoff

    async def wait_for_retries(self, streams: int, retries: int) -> None:
        async with asyncio.timeout(10):
            while len(self.made) < streams or min(len(b.delays) for b in self.made) < retries:
                self.asked.clear()
                await self.asked.wait()


async def create(directory: Path, *entries: RegistrationEntry) -> list[str]:
    async with EntryClient(entry_socket(directory)) as client:
        results = await client.create_entries(entries)
    assert all(r.ok for r in results), results
    return [r.id for r in results]


@contextlib.asynccontextmanager
async def background(coroutine: Coroutine[Any, Any, None]) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(coroutine)
    try:
        yield task
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def is_synced(store: SvidStore) -> bool:
    return store.synced  # a call, so mypy does not narrow the property across awaits


def leaf_der(svid: X509Svid) -> bytes:
    return svid.leaf.public_bytes(serialization.Encoding.DER)


async def test_two_workloads_rotate_with_events_and_no_gap() -> None:
    with short_dir() as directory:
        async with running(options(directory, svid_ttl=dt.timedelta(seconds=4))):
            await create(
                directory,
                RegistrationEntry(AUTHD_ID, PARENT, (ME,)),
                RegistrationEntry(W1, PARENT, (S1,)),
                RegistrationEntry(W2, PARENT, (S2, Selector("unix", "gid:1002"))),
            )
            store = SvidStore(needs_own=False)
            client = DelegatedIdentityClient(
                admin_endpoint(directory), store, backoff=CountingBackoff(), status=StreamBoard(lambda: None)
            )
            held: dict[SpiffeId, X509Svid] = {}
            rotations = {W1: 0, W2: 0}
            with store.subscribe() as events:
                async with background(client.run()):
                    await until(events, lambda: store.ready)  # bundles first, to verify every SVID
                    client.set_workloads({W1: [S1], W2: [S2, Selector("unix", "gid:1002")]})
                    async with asyncio.timeout(20):
                        while min(rotations.values()) < 2:
                            event = await events.get()
                            if event.kind in (EventKind.BUNDLE_CHANGED, EventKind.SYNCED):
                                continue
                            assert event.spiffe_id in (W1, W2)
                            current = store.svid_for(event.spiffe_id)
                            assert current is not None
                            at = now()
                            verify_chain(current.chain, store, at=at, authorize=authorize_id(event.spiffe_id))
                            previous = held.get(event.spiffe_id)
                            if event.kind is EventKind.ADDED:
                                assert previous is None
                            else:
                                assert event.kind is EventKind.ROTATED
                                assert previous is not None
                                assert leaf_der(previous) != leaf_der(current)
                                # No gap: the old SVID was still valid when its successor arrived, and
                                # the successor was already valid then.
                                assert at < previous.not_after
                                assert current.not_before <= at
                                rotations[event.spiffe_id] += 1
                            held[event.spiffe_id] = current
            assert store.stats.rejected == {}


async def test_killed_dev_spire_keeps_last_good_svids_and_client_reconnects_with_backoff() -> None:
    with short_dir() as directory:
        seed = write_entries(
            directory / "entries.toml",
            [
                {"spiffe_id": str(AUTHD_ID), "node": "node-a", "selectors": [str(ME)]},
                {"spiffe_id": str(W1), "node": "node-a", "selectors": [str(S1)], "ttl": 30},
                {"spiffe_id": str(W2), "node": "node-a", "selectors": [str(S2)], "ttl": 30},
            ],
        )
        args = [
            "--dir", str(directory), "--trust-domain", "example.org", "--node", "node-a",
            "--entries", str(seed), "--authorized-delegate", str(AUTHD_ID),
        ]  # fmt: skip
        spire = DevSpireProcess(args)
        await spire.start()
        try:
            store = SvidStore(needs_own=False)
            board_changed = asyncio.Event()
            board = StreamBoard(board_changed.set)
            backoffs = RecordingBackoffs()
            client = DelegatedIdentityClient(admin_endpoint(directory), store, backoff=backoffs, status=board)
            client.set_workloads({W1: [S1], W2: [S2]})
            with store.subscribe() as events:
                async with background(client.run()):
                    await until(events, lambda: set(store.local_svids()) == {W1, W2} and store.ready)
                    before = {sid: leaf_der(svid) for sid, svid in store.local_svids().items()}
                    bundle_before = store.bundle_for(TD)
                    assert set(before) == {W1, W2}

                    await spire.kill()
                    # Three streams (bundles and one per selector set), each retried a few times.
                    await backoffs.wait_for_retries(streams=3, retries=3)
                    # Meanwhile the last good SVIDs and bundle are still served, and health says why.
                    assert {sid: leaf_der(svid) for sid, svid in store.local_svids().items()} == before
                    assert store.bundle_for(TD) == bundle_before
                    assert set(board.down) == {
                        "delegated-bundles",
                        "delegated-svids[unix:uid:1001]",
                        "delegated-svids[unix:uid:1002]",
                    }
                    for backoff in backoffs.made:
                        first = backoff.delays[:3]
                        assert first == sorted(first)  # exponential growth (jitter is only +-20%)
                        assert max(backoff.delays) <= 0.4
                    resets = [backoff.resets for backoff in backoffs.made]
                    restarted = DevSpireProcess(args)
                    await restarted.start()
                    spire = restarted
                    # The restarted agent mints new SVIDs; the same CA (kept in its state) signs them.
                    await until(
                        events,
                        lambda: all(
                            leaf_der(svid) != before[sid] for sid, svid in store.local_svids().items()
                        ),
                        within=15,
                    )
                    assert store.bundle_for(TD) == bundle_before
                    for spiffe_id in (W1, W2):
                        svid = store.svid_for(spiffe_id)
                        assert svid is not None
                        verify_chain(svid.chain, store, at=now(), authorize=authorize_id(spiffe_id))
                    async with asyncio.timeout(10):  # every stream back, including the bundles
                        while board.down:
                            board_changed.clear()
                            await board_changed.wait()
                    assert all(b.resets > r for b, r in zip(backoffs.made, resets, strict=True))
            assert await spire.terminate() == 0
            assert not workload_socket(directory, "node-a").exists()
            assert not admin_socket(directory, "node-a").exists()
        finally:
            await spire.kill()


async def test_ca_rotation_reaches_the_store_as_bundle_changes() -> None:
    with short_dir() as directory:
        opts = options(directory, svid_ttl=dt.timedelta(seconds=3), ca_ttl=dt.timedelta(seconds=4))
        async with running(opts) as spire:
            await create(
                directory, RegistrationEntry(AUTHD_ID, PARENT, (ME,)), RegistrationEntry(W1, PARENT, (S1,))
            )
            first_ca = spire.authorities[TD].current.cert
            store = SvidStore(needs_own=False)
            client = DelegatedIdentityClient(
                admin_endpoint(directory), store, backoff=CountingBackoff(), status=StreamBoard(lambda: None)
            )
            client.set_workloads({W1: [S1]})
            with store.subscribe() as events:
                async with background(client.run()):
                    await next_event(events, lambda e: e.kind is EventKind.BUNDLE_CHANGED)
                    # Half-way through the CA's life its successor is published, before it signs anything.
                    await next_event(events, lambda e: e.kind is EventKind.BUNDLE_CHANGED)
                    bundle = store.bundle_for(TD)
                    assert bundle is not None
                    assert len(bundle.authorities) == 2
                    assert bundle.authorities[0] == first_ca
                    successor = bundle.authorities[1]
                    # Then SVIDs signed by the successor arrive, and verify against the bundle held.
                    async with asyncio.timeout(10):
                        while True:
                            await next_event(
                                events, lambda e: e.kind is EventKind.ROTATED and e.spiffe_id == W1
                            )
                            svid = store.svid_for(W1)
                            assert svid is not None
                            if svid.leaf.issuer == successor.subject:
                                break
                    verify_chain(svid.chain, store, at=now(), authorize=authorize_id(W1))
                    # Once expired, the first CA leaves the bundle.
                    async with asyncio.timeout(10):
                        while True:
                            await next_event(events, lambda e: e.kind is EventKind.BUNDLE_CHANGED)
                            bundle = store.bundle_for(TD)
                            assert bundle is not None
                            if first_ca not in bundle.authorities:
                                break
                    assert successor in bundle.authorities


async def test_workloads_follow_set_workloads_and_entry_changes() -> None:
    with short_dir() as directory:
        async with running(options(directory)):
            w1_entry, _ = await create(
                directory, RegistrationEntry(W1, PARENT, (S1,)), RegistrationEntry(AUTHD_ID, PARENT, (ME,))
            )
            store = SvidStore(needs_own=False)
            board = StreamBoard(lambda: None)
            client = DelegatedIdentityClient(
                admin_endpoint(directory), store, backoff=CountingBackoff(), status=board
            )
            with store.subscribe() as events:
                async with background(client.run()):
                    assert not is_synced(store)
                    client.set_workloads({W1: [S1]})
                    await next_event(events, lambda e: e.kind is EventKind.ADDED and e.spiffe_id == W1)
                    await until(events, lambda: store.synced)
                    # A second workload appears on the node; its entry is registered a moment later.
                    client.set_workloads({W1: [S1], W2: [S2]})
                    await create(directory, RegistrationEntry(W2, PARENT, (S2,)))
                    await next_event(events, lambda e: e.kind is EventKind.ADDED and e.spiffe_id == W2)
                    # The first leaves the node: its SVID is dropped at once.
                    client.set_workloads({W2: [S2]})
                    await next_event(events, lambda e: e.kind is EventKind.REMOVED and e.spiffe_id == W1)
                    assert set(store.local_svids()) == {W2}
                    assert "delegated-svids[unix:uid:1001]" not in board.down
                    # SPIRE stops issuing W2 (entry deleted): the stream's empty list removes it too.
                    async with EntryClient(entry_socket(directory)) as entries:
                        listed = await entries.list_entries(spiffe_id=W2)
                        await entries.delete_entries([listed[0].id])
                    await next_event(events, lambda e: e.kind is EventKind.REMOVED and e.spiffe_id == W2)
                    assert store.local_svids() == {}
                    assert store.synced  # SPIRE answered: W2 has no identity, which is the truth
                    assert w1_entry


async def test_federated_bundles_are_held_per_trust_domain() -> None:
    with short_dir() as directory:
        async with running(options(directory, federated_trust_domain=PARTNER)):
            await create(
                directory,
                RegistrationEntry(AUTHD_ID, PARENT, (ME,)),
                RegistrationEntry(W1, PARENT, (S1,), federates_with=(PARTNER,)),
            )
            store = SvidStore(needs_own=False)
            client = DelegatedIdentityClient(
                admin_endpoint(directory), store, backoff=CountingBackoff(), status=StreamBoard(lambda: None)
            )
            client.set_workloads({W1: [S1]})
            async with background(client.run()):
                await asyncio.wait_for(store.wait_ready(), 10)
                assert set(store.bundles().bundles) == {TD, PARTNER}
                partner_svid = mint_svid(
                    directory, SpiffeId.parse("spiffe://partner.org/api"), dt.timedelta(minutes=5)
                )
                peer = verify_chain(partner_svid.chain, store, at=now(), authorize=lambda _id: None)
                assert peer.trust_domain == PARTNER
            response = await first_svids(directory, [S1])
            assert list(response.federates_with) == ["spiffe://partner.org"]


async def test_more_workloads_than_one_http2_connection_carries_streams() -> None:
    # h2 allows 100 concurrent streams per connection by default and gRPC shares one connection among
    # channels to the same target: both limits must be out of the way (SPIRE's server has none).
    count = 120
    workloads = {
        SpiffeId.parse(f"spiffe://example.org/w{i}"): Selector("unix", f"uid:{20000 + i}")
        for i in range(count)
    }
    with short_dir() as directory:
        async with running(options(directory)):
            await create(
                directory,
                RegistrationEntry(AUTHD_ID, PARENT, (ME,)),
                *(
                    RegistrationEntry(spiffe_id, PARENT, (selector,))
                    for spiffe_id, selector in workloads.items()
                ),
            )
            store = SvidStore(needs_own=False)
            client = DelegatedIdentityClient(
                admin_endpoint(directory), store, backoff=CountingBackoff(), status=StreamBoard(lambda: None)
            )
            client.set_workloads({spiffe_id: [selector] for spiffe_id, selector in workloads.items()})
            with store.subscribe() as events:
                async with background(client.run()):
                    await until(events, lambda: len(store.local_svids()) == count, within=30)


# ---------------------------------------------------------------------------------------------- errors


async def first_svids(
    directory: Path, selectors: list[Selector], pid: int = 0
) -> delegatedidentity_pb2.SubscribeToX509SVIDsResponse:
    request = delegatedidentity_pb2.SubscribeToX509SVIDsRequest(
        selectors=[types_pb2.Selector(type=s.type, value=s.value) for s in selectors], pid=pid
    )
    async with grpc.aio.insecure_channel(f"unix://{admin_socket(directory, 'node-a')}") as channel:
        method = channel.unary_stream(
            SUBSCRIBE_X509_SVIDS,
            request_serializer=delegatedidentity_pb2.SubscribeToX509SVIDsRequest.SerializeToString,
            response_deserializer=delegatedidentity_pb2.SubscribeToX509SVIDsResponse.FromString,
        )
        async for message in method(request):
            return message
    raise AssertionError("stream ended")


async def first_bundles(directory: Path) -> delegatedidentity_pb2.SubscribeToX509BundlesResponse:
    async with grpc.aio.insecure_channel(f"unix://{admin_socket(directory, 'node-a')}") as channel:
        method = channel.unary_stream(
            SUBSCRIBE_X509_BUNDLES,
            request_serializer=delegatedidentity_pb2.SubscribeToX509BundlesRequest.SerializeToString,
            response_deserializer=delegatedidentity_pb2.SubscribeToX509BundlesResponse.FromString,
        )
        async for message in method(delegatedidentity_pb2.SubscribeToX509BundlesRequest()):
            return message
    raise AssertionError("stream ended")


async def refused(call: Coroutine[Any, Any, object]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value.code(), caught.value.details() or ""


async def test_caller_without_identity_or_not_a_delegate_is_refused() -> None:
    with short_dir() as directory:
        async with running(options(directory, authorized_delegates=())):
            denied = (grpc.StatusCode.PERMISSION_DENIED, "no identity issued")
            assert await refused(first_svids(directory, [S1])) == denied
            assert await refused(first_bundles(directory)) == denied
            await create(directory, RegistrationEntry(AUTHD_ID, PARENT, (ME,)))
            not_delegate = (
                grpc.StatusCode.PERMISSION_DENIED,
                "caller not configured as an authorized delegate",
            )
            assert await refused(first_svids(directory, [S1])) == not_delegate
            assert await refused(first_bundles(directory)) == not_delegate


@pytest.mark.parametrize(
    ("selectors", "pid", "message"),
    [
        ([S1], os.getpid(), "must provide either selectors or non-zero PID, but not both"),
        ([], 0, "must provide either selectors or non-zero PID, but not both"),
        ([Selector("unix:uid", "1001")], 0, "could not parse provided selectors"),
        ([Selector("unix", "")], 0, "could not parse provided selectors"),
        ([Selector("", "uid:1001")], 0, "could not parse provided selectors"),
    ],
    ids=["both", "neither", "colon-in-type", "empty-value", "empty-type"],
)
async def test_bad_subscription_requests_are_invalid_argument(
    selectors: list[Selector], pid: int, message: str
) -> None:
    with short_dir() as directory:
        async with running(options(directory)):
            await create(directory, RegistrationEntry(AUTHD_ID, PARENT, (ME,)))
            assert await refused(first_svids(directory, selectors, pid)) == (
                grpc.StatusCode.INVALID_ARGUMENT,
                message,
            )


async def test_selectors_matching_nothing_get_an_empty_list_and_pid_is_attested() -> None:
    with short_dir() as directory:
        async with running(options(directory)):
            await create(directory, RegistrationEntry(AUTHD_ID, PARENT, (ME,)))
            empty = await first_svids(directory, [Selector("unix", "uid:4242424")])
            assert list(empty.x509_svids) == []
            by_pid = await first_svids(directory, [], pid=os.getpid())
            assert [(s.x509_svid.id.trust_domain, s.x509_svid.id.path) for s in by_pid.x509_svids] == [
                ("example.org", "/authd/node-a")
            ]
            assert len(by_pid.x509_svids[0].x509_svid.cert_chain) == 1  # one DER certificate per element
            bundles = await first_bundles(directory)
            assert list(bundles.ca_certificates) == ["spiffe://example.org"]


async def test_refused_subscription_stops_alone() -> None:
    with short_dir() as directory:
        async with running(options(directory)):
            await create(
                directory, RegistrationEntry(AUTHD_ID, PARENT, (ME,)), RegistrationEntry(W1, PARENT, (S1,))
            )
            store = SvidStore(needs_own=False)
            board_changed = asyncio.Event()
            board = StreamBoard(board_changed.set)
            backoff = CountingBackoff()
            client = DelegatedIdentityClient(admin_endpoint(directory), store, backoff=backoff, status=board)
            bad = Selector("unix:uid", "1002")
            client.set_workloads({W1: [S1], W2: [bad]})
            with store.subscribe() as events:
                async with background(client.run()) as task:
                    await next_event(events, lambda e: e.kind is EventKind.ADDED and e.spiffe_id == W1)
                    async with asyncio.timeout(5):
                        while "delegated-svids[unix:uid:1002]" not in board.down:
                            board_changed.clear()
                            await board_changed.wait()
                    assert (
                        "INVALID_ARGUMENT 'could not parse provided selectors'"
                        in board.down["delegated-svids[unix:uid:1002]"]
                    )
                    assert not task.done()
                    assert store.svid_for(W1) is not None
                    assert backoff.delays == 0  # refused for good: not retried
                    await until(events, lambda: store.synced)  # a refusal is an answer too


async def test_a_removed_federated_trust_domain_is_dropped_within_the_reopen_period() -> None:
    """dev-spire, like SPIRE, keeps sending a trust domain on an open bundle stream after it is removed;
    authd reopens the stream on a schedule, and the fresh set removes it, so its peers stop verifying."""
    with short_dir() as directory:
        async with running(options(directory, federated_trust_domain=PARTNER)) as spire:
            await create(directory, RegistrationEntry(AUTHD_ID, PARENT, (ME,)))
            peer = spire.authorities[PARTNER].mint(
                SpiffeId.parse("spiffe://partner.org/web"), dt.timedelta(hours=1), now()
            )
            stores = {reopen: SvidStore(needs_own=False) for reopen in (1.0, 3600.0)}
            clients = [
                DelegatedIdentityClient(
                    admin_endpoint(directory),
                    store,
                    backoff=CountingBackoff(),
                    status=StreamBoard(lambda: None),
                    bundle_reopen=reopen,
                )
                for reopen, store in stores.items()
            ]
            quick, slow = stores[1.0], stores[3600.0]
            with quick.subscribe() as events, slow.subscribe() as slow_events:
                async with background(clients[0].run()), background(clients[1].run()):
                    await until(events, lambda: quick.bundle_for(PARTNER) is not None)
                    await until(slow_events, lambda: slow.bundle_for(PARTNER) is not None)
                    verify_chain(peer.chain, quick, at=now(), authorize=authorize_id(peer.spiffe_id))
                    spire.remove_federated_trust_domain(PARTNER)
                    assert PARTNER.id_string() not in (await first_bundles(directory)).ca_certificates
                    removed_at = asyncio.get_running_loop().time()
                    await until(events, lambda: quick.bundle_for(PARTNER) is None, within=5)
                    assert asyncio.get_running_loop().time() - removed_at < 2.5  # one reopen period, and some
                    with pytest.raises(SvidError) as caught:
                        verify_chain(peer.chain, quick, at=now(), authorize=authorize_id(peer.spiffe_id))
                    assert caught.value.rule == "unknown-trust-domain"
                    # Without a reopen, the open stream goes on sending the removed trust domain.
                    assert slow.bundle_for(PARTNER) is not None
                    assert quick.bundle_for(TD) is not None
