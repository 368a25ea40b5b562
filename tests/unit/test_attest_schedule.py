from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
from collections.abc import AsyncIterator, Collection

import pytest

from authd.attest.client import Target
from authd.attest.schedule import Attestations, Peer
from authd.backoff import BackoffPolicy
from authd.errors import AttestError
from authd.identity import SpiffeId, TrustDomain, node_id
from authd.x509svid import BundleSet, X509Svid
from tests.fakes.attest import ScriptedAttestClient
from tests.fakes.ca import LeafOptions, TestCA
from tests.waiting import eventually

WEB = SpiffeId.parse("spiffe://example.org/web")
DB = SpiffeId.parse("spiffe://example.org/db")
NODE_A = SpiffeId.parse("spiffe://example.org/authd/node-a")
FAST = BackoffPolicy(initial=0.05, maximum=0.05, jitter=0)


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def ca() -> TestCA:
    return TestCA.create(
        "example.org", not_before=now() - dt.timedelta(days=1), not_after=now() + dt.timedelta(days=1)
    )


def svid(authority: TestCA, spiffe_id: SpiffeId, lifetime: float, *, age: float = 0.0) -> X509Svid:
    start = now() - dt.timedelta(seconds=age)
    return authority.mint(
        str(spiffe_id), LeafOptions(not_before=start, not_after=start + dt.timedelta(seconds=lifetime))
    )


def target(spiffe_id: SpiffeId, node: str = "node-a") -> Target:
    return Target(spiffe_id, node, node_id(TrustDomain("example.org"), node), ("192.0.2.1",), 4250)


class Changes:
    def __init__(self) -> None:
        self.count = 0
        self.peers: list[Peer] = []

    def __call__(self, peers: Collection[Peer]) -> None:
        self.count += 1
        self.peers.extend(peers)


@contextlib.asynccontextmanager
async def running(
    client: ScriptedAttestClient, *, renew_after: float = 0.6
) -> AsyncIterator[tuple[Attestations, Changes]]:
    changes = Changes()
    attestations = Attestations(
        client, renew_after=renew_after, backoff=FAST, max_in_flight=4, on_change=changes
    )
    task = asyncio.create_task(attestations.run())
    try:
        yield attestations, changes
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_each_wanted_peer_is_attested_once() -> None:
    authority, client = ca(), ScriptedAttestClient()
    client.script(str(WEB), "node-a", svid(authority, WEB, 3600))
    client.script(str(WEB), "node-b", svid(authority, WEB, 3600))
    async with running(client) as (attestations, changes):
        attestations.want({Peer(WEB, "node-a"): target(WEB), Peer(WEB, "node-b"): target(WEB, "node-b")})
        await eventually(lambda: len(attestations.results()) == 2)
        assert not attestations.request(Peer(WEB, "node-a"))  # fresh result: nothing to do
        await asyncio.sleep(0.05)
    assert client.calls == {(str(WEB), "node-a"): 1, (str(WEB), "node-b"): 1}
    assert changes.count == 2


async def test_requests_while_in_flight_share_one_handshake() -> None:
    authority, client = ca(), ScriptedAttestClient()
    client.script(str(WEB), "node-a", svid(authority, WEB, 3600))
    client.gate = asyncio.Event()
    async with running(client) as (attestations, _changes):
        attestations.want({Peer(WEB, "node-a"): target(WEB)})
        await eventually(lambda: client.calls[(str(WEB), "node-a")] == 1)
        assert [attestations.request(Peer(WEB, "node-a")) for _ in range(5)] == [False] * 5
        client.gate.set()
        await eventually(lambda: attestations.result(Peer(WEB, "node-a")) is not None)
    assert client.calls[(str(WEB), "node-a")] == 1


async def test_renews_and_retries_until_the_remote_rotates() -> None:
    authority, client = ca(), ScriptedAttestClient()
    first = svid(authority, WEB, 10, age=7)  # past its renewal point (0.6 of 10 s) from the start
    rotated = svid(authority, WEB, 3600)
    client.script(str(WEB), "node-a", first, first, first, rotated)
    async with running(client) as (attestations, changes):
        attestations.want({Peer(WEB, "node-a"): target(WEB)})
        await eventually(lambda: attestations.result(Peer(WEB, "node-a")) is not None)
        await eventually(lambda: client.calls[(str(WEB), "node-a")] == 4, within=3)
        result = attestations.result(Peer(WEB, "node-a"))
        assert result is not None
        assert result.serial == rotated.leaf.serial_number
    assert attestations.stats.attempts["rotated-not-yet"] == 2
    assert (
        changes.count == 2
    )  # first result, then the rotated one; repeats of the same certificate are silent


async def test_transient_failure_keeps_the_result_and_an_answer_drops_it() -> None:
    authority, client = ca(), ScriptedAttestClient()
    good = svid(authority, WEB, 3600)
    client.script(str(WEB), "node-a", good)
    async with running(client, renew_after=0.999) as (attestations, changes):
        peer = Peer(WEB, "node-a")
        attestations.want({peer: target(WEB)})
        await eventually(lambda: attestations.result(peer) is not None)
        client.answers[(str(WEB), "node-a")].clear()
        client.script(str(WEB), "node-a", AttestError("unreachable", "down"))
        attestations.bundles_changed(BundleSet.of([authority.bundle()]))  # still verifies: nothing happens
        assert attestations.result(peer) is not None
        # Force a re-attestation through a bundle change that fails verification...
        attestations.bundles_changed(BundleSet({}))
        assert attestations.result(peer) is None
        assert changes.count == 2
        await eventually(lambda: attestations.stats.attempts["unreachable"] >= 1)
        # ...then a success, then an answer that the identity is not hosted any more.
        client.answers[(str(WEB), "node-a")].clear()
        client.script(str(WEB), "node-a", good)
        await eventually(lambda: attestations.result(peer) is not None)
        client.answers[(str(WEB), "node-a")].clear()
        client.script(str(WEB), "node-a", AttestError("unreachable", "down"))
        attestations.request(peer)  # fresh: refused
        attestations._peers[peer].result = None  # expire it without waiting an hour
        assert attestations.request(peer)
        await eventually(lambda: attestations.stats.attempts["unreachable"] >= 2)


@pytest.mark.parametrize("reason", ["node-expired", "own-certificate-expired"])
async def test_an_expired_node_svid_keeps_the_result_until_it_expires(reason: str) -> None:
    # SPIRE down: a node SVID (the peer's or ours) expires before the workloads' SVIDs, as it was
    # issued first. Taken as an answer, it dropped the result, and the auth entry, before its expiry.
    authority, client = ca(), ScriptedAttestClient()
    short = svid(authority, WEB, 10, age=7)  # due for renewal at once
    client.script(str(WEB), "node-a", short, AttestError(reason, "node SVID expired"))
    async with running(client) as (attestations, changes):
        peer = Peer(WEB, "node-a")
        attestations.want({peer: target(WEB)})
        await eventually(lambda: attestations.stats.attempts[reason] >= 1)
        assert attestations.result(peer) is not None
        assert not attestations.refused(peer)
        assert changes.count == 1  # appeared; never dropped


async def test_not_hosted_answer_drops_a_held_result() -> None:
    authority, client = ca(), ScriptedAttestClient()
    short = svid(authority, WEB, 10, age=7)
    client.script(str(WEB), "node-a", short, AttestError("not-hosted", "gone"))
    async with running(client) as (attestations, changes):
        peer = Peer(WEB, "node-a")
        attestations.want({peer: target(WEB)})
        await eventually(lambda: attestations.stats.attempts["not-hosted"] >= 1)
        assert attestations.stats.attempts["ok"] == 1
        assert attestations.result(peer) is None
        assert changes.count == 2  # appeared, then dropped


async def test_unwanted_peers_are_forgotten() -> None:
    authority, client = ca(), ScriptedAttestClient()
    client.script(str(WEB), "node-a", svid(authority, WEB, 3600))
    client.script(str(DB), "node-a", svid(authority, DB, 3600))
    async with running(client) as (attestations, changes):
        attestations.want({Peer(WEB, "node-a"): target(WEB), Peer(DB, "node-a"): target(DB)})
        await eventually(lambda: len(attestations.results()) == 2)
        attestations.want({Peer(DB, "node-a"): target(DB)})
        assert set(attestations.results()) == {Peer(DB, "node-a")}
        assert not attestations.request(Peer(WEB, "node-a"))
    assert changes.count == 3


@pytest.mark.parametrize("reason", ["unreachable", "timeout"])
async def test_failures_are_retried_with_backoff(reason: str) -> None:
    authority, client = ca(), ScriptedAttestClient()
    client.script(
        str(WEB), "node-a", AttestError(reason, "x"), AttestError(reason, "x"), svid(authority, WEB, 3600)
    )
    async with running(client) as (attestations, _changes):
        attestations.want({Peer(WEB, "node-a"): target(WEB)})
        await eventually(lambda: attestations.result(Peer(WEB, "node-a")) is not None)
    assert client.calls[(str(WEB), "node-a")] == 3
    assert attestations.stats.attempts[reason] == 2


async def test_a_restarted_run_attests_the_peer_whose_attempt_crashed_the_last_one() -> None:
    # Anything but AttestError from an attempt ends run(), and the supervisor starts it again. Found in
    # the end-to-end tests: the peer stayed "in flight" across the restart and was never attested again,
    # so its auth entries never came back.
    authority, client = ca(), ScriptedAttestClient()
    client.script(str(WEB), "node-a", RuntimeError("a bug in the client"), svid(authority, WEB, 3600))
    client.script(str(DB), "node-a", svid(authority, DB, 3600))
    client.gate = asyncio.Event()  # both attempts start before the first one fails
    attestations = Attestations(client, renew_after=0.6, backoff=FAST, max_in_flight=4, on_change=Changes())
    attestations.want({Peer(WEB, "node-a"): target(WEB), Peer(DB, "node-a"): target(DB)})
    first_run = asyncio.create_task(attestations.run())
    await eventually(lambda: sum(client.calls.values()) == 2)
    client.gate.set()
    with pytest.raises(ExceptionGroup):
        await first_run

    second_run = asyncio.create_task(attestations.run())
    try:
        await eventually(lambda: len(attestations.results()) == 2)
    finally:
        second_run.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await second_run


async def test_a_restarted_loop_attests_peers_whose_attempt_was_cut_short() -> None:
    authority, client = ca(), ScriptedAttestClient()
    client.script(str(WEB), "node-a", svid(authority, WEB, 3600))
    client.gate = asyncio.Event()
    changes = Changes()
    attestations = Attestations(client, renew_after=0.6, backoff=FAST, max_in_flight=4, on_change=changes)
    first = asyncio.create_task(attestations.run())
    attestations.want({Peer(WEB, "node-a"): target(WEB)})
    await eventually(lambda: client.calls[(str(WEB), "node-a")] == 1)
    first.cancel()  # as when the job fails and the supervisor restarts it
    with contextlib.suppress(asyncio.CancelledError):
        await first
    client.gate.set()
    second = asyncio.create_task(attestations.run())
    try:
        await eventually(lambda: attestations.result(Peer(WEB, "node-a")) is not None)
    finally:
        second.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await second
    assert client.calls[(str(WEB), "node-a")] == 2


async def test_on_demand_requests_pull_a_far_retry_forward_but_not_closer_than_the_interval() -> None:
    client = ScriptedAttestClient()
    client.script(str(WEB), "node-a", AttestError("unreachable", "node-a is down"))
    slow = BackoffPolicy(initial=30, maximum=30, jitter=0)
    interval = dt.timedelta(milliseconds=100)
    attestations = Attestations(
        client,
        renew_after=0.6,
        backoff=slow,
        max_in_flight=4,
        on_change=Changes(),
        on_demand_interval=interval,
    )
    peer = Peer(WEB, "node-a")
    task = asyncio.create_task(attestations.run())
    try:
        attestations.want({peer: target(WEB)})
        assert not attestations.request(peer)  # due now already
        await eventually(lambda: attestations.stats.attempts["unreachable"] == 1)
        # The backoff says 30 s; traffic waiting says now, but not within the interval of the attempt.
        started = asyncio.get_running_loop().time()
        while asyncio.get_running_loop().time() - started < 0.45:
            attestations.request(peer)
            await asyncio.sleep(0.005)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    attempts = client.calls[(str(WEB), "node-a")]
    assert 3 <= attempts <= 1 + 0.45 / interval.total_seconds() + 1


async def test_a_peer_whose_node_moved_is_asked_at_its_new_address_at_once() -> None:
    authority, client = ca(), ScriptedAttestClient()
    client.script(str(WEB), "node-a", AttestError("unreachable", "old address"))
    slow = BackoffPolicy(initial=30, maximum=30, jitter=0)
    attestations = Attestations(client, renew_after=0.6, backoff=slow, max_in_flight=4, on_change=Changes())
    peer = Peer(WEB, "node-a")
    task = asyncio.create_task(attestations.run())
    try:
        attestations.want({peer: target(WEB)})
        await eventually(lambda: attestations.stats.attempts["unreachable"] == 1)
        client.answers[(str(WEB), "node-a")].clear()
        client.script(str(WEB), "node-a", svid(authority, WEB, 3600))
        attestations.want({peer: Target(WEB, "node-a", NODE_A, ("192.0.2.99",), 4250)})
        await eventually(lambda: attestations.result(peer) is not None)
        assert attestations.result(peer).address == "192.0.2.99"  # type: ignore[union-attr]
        # Moving again while the result is valid changes nothing until the renewal.
        attestations.want({peer: Target(WEB, "node-a", NODE_A, ("192.0.2.100",), 4250)})
        await asyncio.sleep(0.05)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert client.calls[(str(WEB), "node-a")] == 2
