"""WireGuard keys over the node channel: two real Channels over loopback TLS, each with an encryption job."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from authd.attest import wire
from authd.attest._proto.channel_pb2 import Hello, WireGuardKey
from authd.attest.channels import Channels, bind
from authd.attest.results import Attestations
from authd.attest.tls import server_context
from authd.cluster.model import ClusterState
from authd.x509svid import BundleSet
from tests.fakes.cluster import node, sid, state
from tests.fakes.identities import FakeIdentities
from tests.fakes.tunnel import FakeTunnel
from tests.integration.test_channel import CONFIG, FAST, LIVE, Changes, live_ca
from tests.waiting import eventually


def nodes_only(port_a: int, port_b: int) -> ClusterState:
    """Two nodes, no endpoints, no policy: only encryption needs a channel between them."""
    return state(
        [node("node-a", "127.0.0.1", attest_port=port_a), node("node-b", "127.0.0.2", attest_port=port_b)]
    )


def agree(a: FakeTunnel, b: FakeTunnel) -> bool:
    """Both ends hold keys from the other, and the same PSK."""
    last_a, last_b = a.last(), b.last()
    return last_a is not None and last_b is not None and last_a.preshared_key == last_b.preshared_key


def knows(tunnel: FakeTunnel, other: FakeTunnel) -> bool:
    """``tunnel`` learned ``other``'s current public key."""
    last = tunnel.last()
    return last is not None and last.public_key == other.pair.public


@dataclass
class Two:
    channels: dict[str, Channels]
    tunnels: dict[str, FakeTunnel]


@contextlib.asynccontextmanager
async def two_nodes() -> AsyncIterator[Two]:
    ca = live_ca()
    bundles = BundleSet.of([ca.bundle()])
    socks = {name: bind(address, 0) for name, address in (("node-a", "127.0.0.1"), ("node-b", "127.0.0.2"))}
    cluster = nodes_only(socks["node-a"].getsockname()[1], socks["node-b"].getsockname()[1])
    made, tunnels, tasks = {}, {}, []
    for name, port in (("node-a", 51820), ("node-b", 51821)):
        identities = FakeIdentities(ca.mint(str(sid(f"authd/{name}")), LIVE), trusted=bundles)
        tunnel = FakeTunnel(port=port)
        channels = Channels(name, identities, Attestations(on_change=Changes()), CONFIG, FAST, tunnel=tunnel)
        channels.cluster_changed(cluster)
        made[name], tunnels[name] = channels, tunnel
        tasks += [asyncio.create_task(channels.run()), asyncio.create_task(channels.serve(socks[name]))]
    try:
        yield Two(made, tunnels)
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for sock in socks.values():
            sock.close()


async def test_each_node_learns_the_others_key_and_the_same_psk_without_any_policy() -> None:
    async with two_nodes() as two:
        a, b = two.tunnels["node-a"], two.tunnels["node-b"]
        await eventually(lambda: agree(a, b))
        (ends_a, keys_a), (ends_b, keys_b) = a.received[-1], b.received[-1]
        assert (keys_a.public_key, keys_a.listen_port) == (b.pair.public, 51821)
        assert (keys_b.public_key, keys_b.listen_port) == (a.pair.public, 51820)
        assert ends_a.peer_name == "node-b"
        assert ends_a.peer_id == sid("authd/node-b")
        assert ends_a.peer_chain  # the node SVID this session verified: the keys are bound to it
        assert ends_b.peer_name == "node-a"
        assert len(keys_a.preshared_key) == 32


async def test_a_new_generation_brings_the_new_key_and_a_new_psk_to_both_ends() -> None:
    async with two_nodes() as two:
        a, b = two.tunnels["node-a"], two.tunnels["node-b"]
        await eventually(lambda: agree(a, b))
        old = b.last()
        assert old is not None
        a.rotate()
        two.channels["node-a"].tunnel_changed()
        await eventually(lambda: knows(b, a) and agree(a, b))
        new = b.last()
        assert new is not None
        assert new.preshared_key != old.preshared_key
        assert two.channels["node-a"].stats.ended.total() + two.channels["node-b"].stats.refused.total() == 0


def key(**fields: object) -> WireGuardKey:
    good: dict[str, object] = {
        "public_key": bytes(range(32)),
        "listen_port": 51820,
        "ephemeral": bytes(range(1, 33)),
        "generation": 1,
    }
    return WireGuardKey(**{**good, **fields})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("frames", "reason"),
    [
        ([key(public_key=bytes(31))], "malformed-wireguard-key"),
        ([key(ephemeral=b"")], "malformed-wireguard-key"),
        ([key(listen_port=0)], "malformed-wireguard-key"),
        ([key(listen_port=70000)], "malformed-wireguard-key"),
        ([key(generation=0)], "malformed-wireguard-key"),
        ([key(ephemeral=bytes(32))], "malformed-wireguard-key"),  # a low-order point: an all-zero secret
        ([key(generation=2), key(generation=2)], "wireguard-generation"),  # a replay in the same session
    ],
)
async def test_a_malformed_wireguard_key_closes_the_channel_counted_and_teaches_nothing(
    frames: list[WireGuardKey], reason: str
) -> None:
    """node-b's authd is hostile: after the hellos it sends WireGuard keys no node may send."""
    ca = live_ca()
    bundles = BundleSet.of([ca.bundle()])
    hostile_sock = bind("127.0.0.2", 0)
    cluster = nodes_only(0, hostile_sock.getsockname()[1])
    served = 0

    async def hostile(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal served
        served += 1
        writer.write(wire.encode(Hello(version=wire.VERSION, nonce=bytes(32))))
        await wire.read(reader)  # node-a's hello
        for frame in frames:
            writer.write(wire.encode(frame))
        await writer.drain()
        await reader.read()
        writer.close()

    server = await asyncio.start_server(
        hostile, sock=hostile_sock, ssl=server_context(ca.mint(str(sid("authd/node-b")), LIVE), bundles)
    )
    identities = FakeIdentities(ca.mint(str(sid("authd/node-a")), LIVE), trusted=bundles)
    tunnel = FakeTunnel()
    channels = Channels("node-a", identities, Attestations(on_change=Changes()), CONFIG, FAST, tunnel=tunnel)
    channels.cluster_changed(cluster)
    task = asyncio.create_task(channels.run())
    try:
        await eventually(lambda: channels.stats.ended[reason] >= 2)
        assert served >= 2  # dialed again after each close: nothing stalled or crashed
        assert not task.done()
        if reason == "wireguard-generation":
            assert all(keys.public_key.raw == bytes(range(32)) for _, keys in tunnel.received)
        else:
            assert tunnel.received == []
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        server.close()
