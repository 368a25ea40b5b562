"""Cluster state for tests: compact builders and a source whose versions a test publishes by hand."""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import AsyncIterator, Iterable

from authd.cluster.model import ClusterState, Encrypt, Endpoint, Enforce, IdentityPattern, Node, PolicyRule
from authd.cluster.source import StateFeed
from authd.cluster.validation import build_state
from authd.identity import Selector, SpiffeId

TD = "example.org"


def sid(path: str, td: str = TD) -> SpiffeId:
    """``sid("web")`` is spiffe://example.org/web."""
    return SpiffeId.parse(f"spiffe://{td}/{path}")


def node(name: str, *addresses: str, attest_port: int | None = None) -> Node:
    """A node with the conventional node ID; addresses default to one in 192.0.2.0/24."""
    index = sum(name.encode()) % 250 + 1
    listed = addresses or (f"192.0.2.{index}",)
    return Node(name, tuple(ipaddress.ip_address(a) for a in listed), sid(f"authd/{name}"), attest_port)


def endpoint(path: str, on: str, *prefixes: str, selectors: Iterable[str] = ()) -> Endpoint:
    """An endpoint of identity ``sid(path)`` on node ``on``."""
    chosen = tuple(selectors) or (f"unix:uid:{sum(path.encode())}",)
    return Endpoint(
        sid(path),
        on,
        tuple(ipaddress.ip_network(p) for p in prefixes),
        tuple(Selector.parse(s) for s in chosen),
    )


def rule(
    source: str, destination: str, enforce: Enforce = "ingress", encrypt: Encrypt = "none"
) -> PolicyRule:
    """A rule between two patterns written as in the cluster file."""
    return PolicyRule(IdentityPattern.parse(source), IdentityPattern.parse(destination), enforce, encrypt)


def state(
    nodes: Iterable[Node] = (), endpoints: Iterable[Endpoint] = (), rules: Iterable[PolicyRule] = ()
) -> ClusterState:
    """A validated snapshot."""
    return build_state(list(nodes), list(endpoints), list(rules))


class FakeClusterSource:
    """A ClusterSource whose versions the test publishes; ``run`` just waits to be cancelled."""

    def __init__(self, initial: ClusterState | None = None) -> None:
        self._feed = StateFeed()
        if initial is not None:
            self._feed.publish(initial)

    def publish(self, new: ClusterState) -> None:
        self._feed.publish(new)

    def current(self) -> ClusterState | None:
        return self._feed.current()

    def snapshots(self) -> AsyncIterator[ClusterState]:
        return self._feed.snapshots()

    async def run(self) -> None:
        await asyncio.Future()
