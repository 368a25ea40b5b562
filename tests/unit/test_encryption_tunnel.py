"""The encryption job against an in-memory WireGuard device: peers from channel keys and cluster state."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ipaddress
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest

from authd.attest.channel import Ends
from authd.cluster.model import ClusterState
from authd.config.model import EncryptionConfig
from authd.config.schema import IpNetwork
from authd.encryption import keys
from authd.encryption.device import PeerStatus
from authd.encryption.keys import KeyPair, PublicKey
from authd.encryption.peers import PeerKeys
from authd.encryption.tunnel import ADOPT_GRACE, GREETING, GREETING_RETRY, Tunnel
from authd.errors import EncryptionError
from authd.health import Health
from authd.x509svid import BundleSet
from tests.fakes.ca import LeafOptions, TestCA
from tests.fakes.cluster import endpoint, node, sid, state
from tests.fakes.wireguard import FakeDevice
from tests.waiting import eventually

NOW = dt.datetime.now(dt.UTC)
CONFIG = EncryptionConfig(mode="wireguard", listen_port=51820, rotation_interval=dt.timedelta(0))
NODES = ("node-a", "node-b", "node-c")


def cluster(*names: str) -> ClusterState:
    """node-a (this one), and each of ``names`` hosting 10.0.<i>.0/24 at 192.0.2.<i>."""
    members = [n for n in NODES if n == "node-a" or n in names]
    return state(
        [node(n, f"192.0.2.{NODES.index(n) + 1}") for n in members],
        [endpoint(f"w{NODES.index(n)}", n, f"10.0.{NODES.index(n) + 1}.0/24") for n in members],
    )


@dataclass
class Clock:
    now: float = NOW.timestamp()

    def __call__(self) -> float:
        return self.now


@dataclass
class Job:
    tunnel: Tunnel
    device: FakeDevice
    clock: Clock
    ca: TestCA
    routes: list[frozenset[IpNetwork]] = field(default_factory=list)
    tunnels: list[int] = field(default_factory=list)

    def ends(self, name: str, lifetime: dt.timedelta = dt.timedelta(hours=1)) -> Ends:
        options = LeafOptions(not_before=NOW - dt.timedelta(minutes=1), not_after=NOW + lifetime)
        svid = self.ca.mint(str(sid(f"authd/{name}")), options)
        return Ends(sid("authd/node-a"), name, sid(f"authd/{name}"), "192.0.2.9", svid.chain)

    def peer_of(self, public: PublicKey) -> PeerStatus | None:
        return self.device.peers.get(public)


@contextlib.asynccontextmanager
async def job(tmp_path: Path, device: FakeDevice | None = None) -> AsyncIterator[Job]:
    made = device or FakeDevice()
    clock = Clock()
    ca = TestCA.create(
        "example.org", not_before=NOW - dt.timedelta(days=1), not_after=NOW + dt.timedelta(days=1)
    )
    routes: list[frozenset[IpNetwork]] = []
    tunnels: list[int] = []
    tunnel = Tunnel(
        CONFIG,
        "node-a",
        Health().register("encryption"),
        state_dir=tmp_path,
        runtime_dir=tmp_path,
        set_tunnel=tunnels.append,
        opener=lambda _config, _runtime: made,
        routes=lambda _ifindex, prefixes: routes.append(prefixes),
        clock=clock,
    )
    task = asyncio.create_task(tunnel.run())
    try:
        await eventually(lambda: tunnel.local_key() is not None)
        yield Job(tunnel, made, clock, ca, routes, tunnels)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def learn(j: Job, name: str, public: PublicKey | None = None, port: int = 51820) -> PeerKeys:
    keys_ = PeerKeys(public or KeyPair.generate().public, bytes([NODES.index(name)]) * 32, port)
    j.tunnel.learned(j.ends(name), keys_)
    return keys_


async def test_one_peer_per_node_with_its_prefixes_port_and_the_channels_psk(tmp_path: Path) -> None:
    async with job(tmp_path) as j:
        assert j.tunnels == [7]  # the datapath was told the interface's index
        j.tunnel.cluster_changed(cluster("node-b", "node-c"))
        b, c = learn(j, "node-b", port=51999), learn(j, "node-c")
        await eventually(lambda: j.peer_of(b.public_key) is not None and j.peer_of(c.public_key) is not None)
        peer = j.peer_of(b.public_key)
        assert peer is not None
        assert peer.endpoint == "192.0.2.2:51999"
        assert peer.allowed_ips == (ipaddress.ip_network("10.0.2.0/24"),)
        assert j.device.psks[b.public_key] == b.preshared_key
        assert j.routes[-1] == {ipaddress.ip_network("10.0.2.0/24"), ipaddress.ip_network("10.0.3.0/24")}
        assert j.device.private_key is not None
        assert j.device.private_key.public == keys.load_or_create(tmp_path).public  # the key file's key


async def test_a_new_key_is_greeted_with_a_keepalive_until_its_first_handshake(tmp_path: Path) -> None:
    """A peer's first key, and its rotated one, get a keepalive (the device handshakes at once), which
    goes once the device reports a handshake with that key; a rotating peer is met at once, not after
    WireGuard's five-second retry."""
    async with job(tmp_path) as j:
        j.tunnel.cluster_changed(cluster("node-b"))
        first = learn(j, "node-b")
        await eventually(lambda: j.device.keepalives.get(first.public_key) == 1)
        j.device.peers[first.public_key] = replace(
            j.device.peers[first.public_key], last_handshake=j.clock.now
        )
        await eventually(lambda: j.device.keepalives[first.public_key] == 0)
        rotated = learn(j, "node-b")  # node-b rotated its key
        await eventually(lambda: j.device.keepalives.get(rotated.public_key) == 1)
        assert j.peer_of(first.public_key) is None
        j.device.peers[rotated.public_key] = replace(
            j.device.peers[rotated.public_key], last_handshake=j.clock.now
        )
        await eventually(lambda: j.device.keepalives[rotated.public_key] == 0)


async def test_a_greeted_peer_without_a_handshake_is_set_afresh(tmp_path: Path) -> None:
    """The rotating node may have applied the new PSK after the first handshake came: the peer is removed
    and added again (WireGuard would not try again for five seconds), until a handshake comes."""
    async with job(tmp_path) as j:
        j.tunnel.cluster_changed(cluster("node-b"))
        b = learn(j, "node-b")
        await eventually(lambda: j.device.keepalives.get(b.public_key) == 1)
        j.device.calls.clear()
        j.clock.now += GREETING_RETRY
        await eventually(lambda: j.device.calls[:2] == ["remove", "peer 192.0.2.2:51820"])
        assert j.device.keepalives[b.public_key] == 1
        j.device.peers[b.public_key] = replace(j.device.peers[b.public_key], last_handshake=j.clock.now)
        await eventually(lambda: j.device.keepalives[b.public_key] == 0)
        j.device.calls.clear()
        j.clock.now += GREETING_RETRY
        await asyncio.sleep(0.2)  # several reconciles: a peer that has handshaken is never set afresh
        assert "remove" not in j.device.calls


async def test_a_greeting_that_meets_no_handshake_ends_after_its_time(tmp_path: Path) -> None:
    async with job(tmp_path) as j:
        j.tunnel.cluster_changed(cluster("node-b"))
        b = learn(j, "node-b")
        await eventually(lambda: j.device.keepalives.get(b.public_key) == 1)
        j.clock.now += GREETING
        await eventually(lambda: j.device.keepalives[b.public_key] == 0)


async def test_a_node_removed_from_cluster_state_loses_its_peer_and_routes(tmp_path: Path) -> None:
    async with job(tmp_path) as j:
        j.tunnel.cluster_changed(cluster("node-b", "node-c"))
        b, c = learn(j, "node-b"), learn(j, "node-c")
        await eventually(lambda: j.peer_of(c.public_key) is not None)
        j.tunnel.cluster_changed(cluster("node-b"))
        await eventually(lambda: j.peer_of(c.public_key) is None, within=1.0)
        assert j.peer_of(b.public_key) is not None
        assert j.routes[-1] == {ipaddress.ip_network("10.0.2.0/24")}
        j.tunnel.cluster_changed(cluster("node-b", "node-c"))  # back again: no peer until its channel speaks
        await eventually(lambda: "node-c" in j.tunnel.snapshot().without_peer)
        assert j.peer_of(c.public_key) is None


async def test_a_key_claimed_by_two_nodes_gives_neither_a_peer(tmp_path: Path) -> None:
    """node-c announces node-b's key: were it accepted, node-b's key would carry node-c's prefixes."""
    async with job(tmp_path) as j:
        j.tunnel.cluster_changed(cluster("node-b", "node-c"))
        b = learn(j, "node-b")
        await eventually(lambda: j.peer_of(b.public_key) is not None)
        learn(j, "node-c", public=b.public_key)
        await eventually(lambda: j.peer_of(b.public_key) is None)
        assert j.tunnel.stats.refused["duplicate-key"] == 1
        assert not j.device.peers


async def test_this_nodes_own_key_is_refused(tmp_path: Path) -> None:
    async with job(tmp_path) as j:
        j.tunnel.cluster_changed(cluster("node-b"))
        own = j.tunnel.local_key()
        assert own is not None
        learn(j, "node-b", public=own.public_key)
        assert j.tunnel.stats.refused["own-key"] == 1
        await asyncio.sleep(0.05)
        assert not j.device.peers


async def test_keys_die_with_the_node_svid_that_brought_them(tmp_path: Path) -> None:
    async with job(tmp_path) as j:
        j.tunnel.cluster_changed(cluster("node-b"))
        b = PeerKeys(KeyPair.generate().public, bytes(32), 51820)
        j.tunnel.learned(j.ends("node-b", lifetime=dt.timedelta(seconds=30)), b)
        await eventually(lambda: j.peer_of(b.public_key) is not None)
        j.clock.now += 31
        j.tunnel.cluster_changed(cluster("node-b"))  # any wake; the expiry alone also wakes the job
        await eventually(lambda: j.peer_of(b.public_key) is None, within=1.0)
        assert j.tunnel.stats.refused["expired"] == 1


async def test_a_bundle_that_no_longer_verifies_the_node_svid_removes_the_peer(tmp_path: Path) -> None:
    async with job(tmp_path) as j:
        j.tunnel.cluster_changed(cluster("node-b"))
        b = learn(j, "node-b")
        await eventually(lambda: j.peer_of(b.public_key) is not None)
        j.tunnel.bundles_changed(BundleSet.of([j.ca.bundle()]))
        await asyncio.sleep(0.05)
        assert j.peer_of(b.public_key) is not None  # still verifies
        other = TestCA.create(
            "example.org", not_before=NOW - dt.timedelta(days=1), not_after=NOW + dt.timedelta(days=1)
        )
        j.tunnel.bundles_changed(BundleSet.of([other.bundle()]))
        await eventually(lambda: j.peer_of(b.public_key) is None, within=1.0)
        assert j.tunnel.stats.refused["untrusted"] == 1


def adopted(tmp_path: Path) -> tuple[FakeDevice, dict[str, PublicKey]]:
    """The interface an earlier authd left: its key, and three peers."""
    pair = keys.load_or_create(tmp_path)
    device = FakeDevice(private_key=pair, listen_port=51820)
    found = {}
    for name, endpoint_, prefix in (
        ("node-b", "192.0.2.2:51820", "10.0.2.0/24"),  # as cluster state has it
        ("node-c", "192.0.2.3:51820", "10.0.2.0/24"),  # node-c with node-b's prefix: not its own
        ("stranger", "192.0.2.99:51820", "10.0.9.0/24"),  # no node of cluster state
    ):
        public = KeyPair.generate().public
        device.peers[public] = PeerStatus(
            public, endpoint_, (ipaddress.ip_network(prefix),), None, 0, 0, has_preshared_key=True
        )
        found[name] = public
    return device, found


async def test_an_adopted_interface_keeps_its_key_and_only_its_plausible_peers(tmp_path: Path) -> None:
    device, found = adopted(tmp_path)
    async with job(tmp_path, device) as j:
        assert "private-key" not in j.device.calls  # same key: sessions survive the restart
        j.tunnel.cluster_changed(cluster("node-b", "node-c"))
        await eventually(lambda: found["stranger"] not in j.device.peers)
        assert found["node-c"] not in j.device.peers
        assert found["node-b"] in j.device.peers  # until node-b's channel is back, or the grace ends
        j.clock.now += ADOPT_GRACE + 1
        j.tunnel.cluster_changed(cluster("node-b", "node-c"))
        await eventually(lambda: found["node-b"] not in j.device.peers)


async def test_an_adopted_peer_is_replaced_by_the_key_its_channel_brings(tmp_path: Path) -> None:
    device, found = adopted(tmp_path)
    async with job(tmp_path, device) as j:
        j.tunnel.cluster_changed(cluster("node-b", "node-c"))
        b = learn(j, "node-b")
        await eventually(lambda: found["node-b"] not in j.device.peers and b.public_key in j.device.peers)


async def test_rotate_installs_stores_and_announces_a_new_key(tmp_path: Path) -> None:
    announced: list[int] = []

    class Announcer:
        def tunnel_changed(self) -> None:
            announced.append(1)

    async with job(tmp_path) as j:
        j.tunnel.announce_through(Announcer())
        before = j.tunnel.local_key()
        assert before is not None
        after = await j.tunnel.rotate()
        assert after.public_key != before.public_key
        assert after.generation == before.generation + 1
        assert j.device.private_key is not None
        assert j.device.private_key.public == after.public_key
        assert keys.load_or_create(tmp_path).public == after.public_key  # the key file follows
        assert announced == [1]
        assert j.tunnel.stats.rotations["ok"] == 1


async def test_rotate_before_the_interface_is_up_fails_counted(tmp_path: Path) -> None:
    tunnel = Tunnel(
        CONFIG,
        "node-a",
        Health().register("encryption"),
        state_dir=tmp_path,
        runtime_dir=tmp_path,
        set_tunnel=lambda _ifindex: None,
    )
    with pytest.raises(EncryptionError, match="not up"):
        await tunnel.rotate()
    assert tunnel.stats.rotations["failed"] == 1
