"""Issue 17: the datapath's verdict sampled against the auth map's expiry over rotations and SPIRE outages.

The real auth manager writes a real loaded datapath's maps (ipcache, policy, auth) from cluster state, a
local SVID and a remote identity's attestation, all of them minted to live LIFE seconds. A driver renews
both SVIDs a few times (SPIRE up), then stops renewing (SPIRE down) while what the channels and the
datapath report during an outage keeps arriving: transient failures of the peer's attestation, "auth
required" for the pair, forced full reconciles. Then SPIRE returns, and the cycle repeats.

Meanwhile a thread runs the ingress program on the pair's packet with BPF_PROG_TEST_RUN, thousands of
times, reading the kernel's clock around each run and the auth map's entry. Every sample must hold:
a packet is never dropped before the expiry of the SVIDs in force (the earlier of the two notAfters,
converted to CLOCK_TAI here, independently of authd's conversion), never passed after it, the map never
shows an expiry later than it, and an expired entry is gone from the map within a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from ipaddress import ip_network

import pytest

from authd.attest.outcomes import transient
from authd.attest.results import Attestation, Attestations, Peer, Target
from authd.authmanager import AuthManager
from authd.cluster.handles import HandleRegistry
from authd.datapath import syscalls
from authd.datapath.layout import ENDPOINT_F_ROUTE, ProgramName
from authd.datapath.loader import Datapath
from authd.datapath.maps import AuthKey, EndpointOwner, PinnedMaps
from authd.datapath.tables import PinnedAuthTable, PinnedTables
from tests.fakes import packets as pk
from tests.fakes.authtables import FakeSvids
from tests.fakes.ca import LeafOptions, TestCA
from tests.fakes.cluster import endpoint, node, rule, sid, state

pytestmark = pytest.mark.privileged

PASS, DROP = -1, 2
LIFE = 2.0  # seconds an SVID lives
RENEW_EVERY = 0.6  # while SPIRE is up
RENEWALS = 3  # per cycle
CYCLES = 3  # SPIRE outages
GONE_WITHIN = 1.0  # an expired entry leaves the map within this
WEB, DB = "10.1.0.1", "10.2.0.1"  # web runs here (on the test run's loopback), db on node-b
LO = 1


def tai_ns(when: datetime) -> int:
    """``when`` on CLOCK_TAI, from the clocks themselves rather than authd's conversion."""
    offset = time.clock_gettime_ns(time.CLOCK_TAI) - time.clock_gettime_ns(time.CLOCK_REALTIME)
    whole = round(offset / 1e9) * 1_000_000_000
    return int(when.timestamp()) * 1_000_000_000 + when.microsecond * 1000 + whole


@dataclass
class Truth:
    """The expiry in force (TAI ns): the earlier notAfter of the SVIDs the driver handed over last."""

    expiry: int = 0
    epoch: int = 0  # one more each time SVIDs are handed over after an outage (or for the first time)
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass
class Samples:
    count: int = 0
    passed: int = 0
    dropped: int = 0
    faults: list[str] = field(default_factory=list)


def sample(
    datapath: Datapath, maps: PinnedMaps, key: AuthKey, truth: Truth, stop: threading.Event
) -> Samples:
    """Run the pair's packet until ``stop``; record each sample that breaks a rule of the module docstring."""
    frame = pk.tcp_frame(DB, WEB, 80, 40000)  # to web: judged as ingress at the egress hook of its interface
    fd = datapath.prog_fd(ProgramName.EGRESS)
    seen = Samples()
    epoch, written_in_epoch = 0, False
    while not stop.is_set():
        written = maps.auth.get_tai_ns(key)  # before the truth: a renewal only ever raises the truth
        with truth.lock:
            expiry, current = truth.expiry, truth.epoch
        before = time.clock_gettime_ns(time.CLOCK_TAI)
        verdict = syscalls.prog_test_run(fd, frame).retval
        after = time.clock_gettime_ns(time.CLOCK_TAI)
        seen.count += 1
        if current != epoch:  # new SVIDs after an outage: denied until the manager has written them
            epoch, written_in_epoch = current, False
        if verdict == DROP:
            seen.dropped += 1
            if after < expiry and written_in_epoch:
                seen.faults.append(f"dropped {(expiry - after) / 1e6:.1f} ms before the expiry")
        elif verdict == PASS:
            seen.passed += 1
            written_in_epoch = True
            if before > expiry:
                seen.faults.append(f"passed {(before - expiry) / 1e6:.1f} ms after the expiry")
        if written is not None and written > expiry:
            seen.faults.append(f"the map shows {(written - expiry) / 1e6:.1f} ms beyond the expiry")
        if written is not None and before > written + int(GONE_WITHIN * 1e9):
            seen.faults.append(f"an entry stayed {(before - written) / 1e9:.2f} s after its expiry")
        time.sleep(0.001)
    return seen


class Peers:
    """The channels as the results see them: the driver answers for the peer node itself."""

    def __init__(self) -> None:
        self.wanted: dict[Peer, Target] = {}

    def want(self, targets: Mapping[Peer, Target]) -> None:
        self.wanted = dict(targets)

    def ask_again(self, peers: Collection[Peer]) -> None:
        del peers

    def hurry(self, node: str) -> bool:
        del node
        return False


async def drive(
    manager: AuthManager,
    handles: HandleRegistry,
    svids: FakeSvids,
    results: Attestations,
    peers: Peers,
    truth: Truth,
) -> None:
    """Renew RENEWALS times, then an outage until past the expiry; CYCLES times."""
    ca = TestCA.create("example.org")
    web, db = sid("web"), sid("db")
    peer = Peer(db, "node-b")
    while peer not in peers.wanted:  # noqa: ASYNC110 - the manager offers no event for it
        await asyncio.sleep(0.01)
    for cycle in range(CYCLES):
        for renewal in range(RENEWALS):
            now = datetime.now(UTC)
            # Stagger the two lifetimes so that either SVID is the first to expire, cycle by cycle.
            local_life = LIFE + (0.5 if (cycle + renewal) % 2 else 0.0)
            remote_life = LIFE + (0.0 if (cycle + renewal) % 2 else 0.5)
            local = ca.mint(str(web), lifetime(now, local_life))
            remote = ca.mint(str(db), lifetime(now, remote_life))
            with truth.lock:
                truth.expiry = max(truth.expiry, tai_ns(min(local.not_after, remote.not_after)))
                truth.epoch += renewal == 0
            svids.local[web] = local
            manager.svids_changed()
            results.proved(Attestation(db, "node-b", "192.0.2.2", remote.chain, datetime.now(UTC)))
            await asyncio.sleep(RENEW_EVERY)
        # SPIRE is down: nothing is renewed, and what an outage brings keeps coming until past the expiry.
        with truth.lock:
            until = truth.expiry
        while time.clock_gettime_ns(time.CLOCK_TAI) < until + int(1.5e9):
            results.failed(peer, transient("channel-closed"), "the peer node's SVID expired")
            manager.auth_required(*pair_handles(handles))
            manager.svids_changed()  # a full reconcile, as a bundle or cluster change would cause
            await asyncio.sleep(0.1)


def lifetime(now: datetime, seconds: float) -> LeafOptions:
    return LeafOptions(not_before=now - timedelta(minutes=1), not_after=now + timedelta(seconds=seconds))


def pair_handles(handles: HandleRegistry) -> tuple[int, int, int]:
    """The handles the manager assigned to web, db and node-b."""
    local, remote = handles.identity_handle(sid("web")), handles.identity_handle(sid("db"))
    node_handle = handles.node_handle("node-b")
    assert local is not None
    assert remote is not None
    assert node_handle is not None
    return local, remote, node_handle


def test_verdicts_follow_the_expiry_through_rotations_and_outages(
    datapath: Datapath, maps: PinnedMaps
) -> None:
    maps.endpoints.update_many({ip_network(f"{WEB}/32"): EndpointOwner(LO, ENDPOINT_F_ROUTE)})
    cluster = state(
        [node("node-a"), node("node-b")],
        [endpoint("web", "node-a", f"{WEB}/32"), endpoint("db", "node-b", f"{DB}/32")],
        [rule("spiffe://example.org/db", "spiffe://example.org/web", "ingress")],
    )
    handles = HandleRegistry(None, "node-a")
    svids = FakeSvids()
    results = Attestations(on_change=lambda changed: manager.attestations_changed(changed))  # noqa: PLW0108 - built below
    peers = Peers()
    results.ask_through(peers)
    manager = AuthManager(
        node_name="node-a",
        handles=handles,
        table=PinnedAuthTable(maps.auth, handles),
        tables=PinnedTables(maps.ipcache, maps.policy),
        svids=svids,
        attestations=results,
        attest_port=4250,
    )
    truth = Truth()
    stop = threading.Event()
    outcome: list[Samples] = []

    async def scene() -> None:
        reconcile = asyncio.create_task(manager.run())
        try:
            manager.cluster_changed(cluster)
            while handles.node_handle("node-b") is None:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
            key = AuthKey(*pair_handles(handles))
            # Handles come before the maps are written: sample once the pair's policy is in force (its
            # packet is dropped, no SVID being handed over yet), since before it the pair is not governed.
            frame, fd = pk.tcp_frame(DB, WEB, 80, 40000), datapath.prog_fd(ProgramName.EGRESS)
            while syscalls.prog_test_run(fd, frame).retval != DROP:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
            sampler = threading.Thread(
                target=lambda: outcome.append(sample(datapath, maps, key, truth, stop)), daemon=True
            )
            sampler.start()
            try:
                await drive(manager, handles, svids, results, peers, truth)
            finally:
                stop.set()
                await asyncio.to_thread(sampler.join, 10)
        finally:
            reconcile.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reconcile

    asyncio.run(scene())
    seen = outcome[0]
    assert not seen.faults, seen.faults[:20]
    # The sampling saw both verdicts many times: traffic passed between renewals and was denied in outages.
    assert seen.passed > 1000, seen
    assert seen.dropped > 300, seen
