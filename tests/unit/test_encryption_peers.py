from __future__ import annotations

import ipaddress

from authd.encryption.keys import PublicKey
from authd.encryption.peers import PeerKeys, desired_peers, tunnel_routes
from tests.fakes.cluster import endpoint, node, state

CLUSTER = state(
    [node("node-a", "192.0.2.1"), node("node-b", "192.0.2.2", "192.0.2.22"), node("node-c", "192.0.2.3")],
    [
        endpoint("web", "node-a", "10.1.0.0/24"),
        endpoint("db", "node-b", "10.2.0.0/24"),
        endpoint("cache", "node-b", "10.2.1.5/32"),
        endpoint("api", "node-c", "10.3.0.0/24"),
    ],
)
B = PeerKeys(PublicKey(b"\2" * 32), b"\x22" * 32)


def test_one_peer_per_remote_node_with_keys_and_its_workload_prefixes() -> None:
    peers = desired_peers(CLUSTER, "node-a", {"node-a": B, "node-b": B}, 51820)
    assert list(peers) == ["node-b"]  # not the local node, not node-c (no keys yet)
    peer = peers["node-b"]
    assert peer.endpoint == (ipaddress.ip_address("192.0.2.2"), 51820)
    assert [str(p) for p in peer.allowed_ips] == ["10.2.0.0/24", "10.2.1.5/32"]
    assert (peer.public_key, peer.preshared_key) == (B.public_key, B.preshared_key)


def test_a_node_removed_from_state_has_no_peer() -> None:
    smaller = state([node("node-a", "192.0.2.1")], [endpoint("web", "node-a", "10.1.0.0/24")])
    assert desired_peers(smaller, "node-a", {"node-b": B}, 51820) == {}


def test_routes_are_the_remote_workload_prefixes() -> None:
    assert tunnel_routes(CLUSTER, "node-a") == {
        ipaddress.ip_network(p) for p in ("10.2.0.0/24", "10.2.1.5/32", "10.3.0.0/24")
    }
