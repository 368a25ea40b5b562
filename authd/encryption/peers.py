"""The WireGuard peers and routes that cluster state implies.

One peer per remote node whose keys arrived over its node channel: its endpoint is the node's first
underlay address, and its AllowedIPs are the prefixes of the workloads cluster state places on it, so
WireGuard accepts an inner source address only from the node that hosts it. A node without keys yet
has no peer; traffic routed to its workloads is dropped by WireGuard (no peer), never sent in clear.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from authd.cluster.model import ClusterState
from authd.config.schema import IpNetwork
from authd.encryption.device import PeerSpec
from authd.encryption.keys import PublicKey


@dataclass(frozen=True, slots=True)
class PeerKeys:
    """What a remote node's channel taught: its public key, the pair's preshared key, its UDP port."""

    public_key: PublicKey
    preshared_key: bytes
    listen_port: int | None = None
    """The port the node announced; None: the ``port`` :func:`desired_peers` is given."""


def workload_prefixes(state: ClusterState, node: str) -> tuple[IpNetwork, ...]:
    """The prefixes of the workloads on ``node``, each once, in a stable order."""
    prefixes = {prefix for endpoint in state.endpoints_on(node) for prefix in endpoint.prefixes}
    return tuple(sorted(prefixes, key=lambda p: (p.version, p.network_address.packed, p.prefixlen)))


def desired_peers(
    state: ClusterState, local: str, keys: Mapping[str, PeerKeys], port: int
) -> dict[str, PeerSpec]:
    """The peer of each remote node in ``state`` with known ``keys``, by node name."""
    peers: dict[str, PeerSpec] = {}
    for name, node in state.nodes.items():
        known = keys.get(name)
        if name == local or known is None or not node.addresses:
            continue
        peers[name] = PeerSpec(
            public_key=known.public_key,
            preshared_key=known.preshared_key,
            endpoint=(node.addresses[0], known.listen_port or port),
            allowed_ips=workload_prefixes(state, name),
        )
    return peers


def tunnel_routes(state: ClusterState, local: str) -> frozenset[IpNetwork]:
    """Prefixes routed into the tunnel: remote workloads only.

    Node addresses stay outside the tunnel (underlay and node channel): cluster state refuses an endpoint
    prefix that contains a node's address (authd/cluster/validation.py).
    """
    return frozenset(
        prefix for name in state.nodes if name != local for prefix in workload_prefixes(state, name)
    )
