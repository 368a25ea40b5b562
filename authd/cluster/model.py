"""Cluster state: nodes, endpoints and authentication policy over SPIFFE IDs; pure and immutable.

A :class:`ClusterState` is one consistent snapshot. Sources (the watched file, later etcd) build it through
:func:`authd.cluster.validation.build_state`, which refuses inconsistent content, so consumers may rely on
unique node names and IDs and on every endpoint naming a known node.

Identity patterns
-----------------
Policy rules name identities with patterns, matched against SPIFFE IDs:

``spiffe://td/ns/app/sa/web``
    exactly that ID.
``spiffe://td/ns/app/*``
    any ID strictly under that path: ``spiffe://td/ns/app/sa/web`` but not ``spiffe://td/ns/app`` itself,
    nor ``spiffe://td/ns/apple``.
``spiffe://td/*``
    any ID in trust domain ``td`` (every workload ID there; the bare trust-domain ID is never a workload).
``*``
    any identity at all, *including traffic from addresses that are not in cluster state* (the "world").
    Only this pattern matches the world; the datapath writes it as one wildcard entry.

``*`` is allowed only alone or as the whole last path segment; the part before ``/*`` must itself be a
valid SPIFFE ID (authd.identity rules). An exact pattern naming a bare trust domain (``spiffe://td``) is
refused: it would match nothing, and the operator almost certainly meant ``spiffe://td/*``.

Policy rules
------------
``PolicyRule(source, destination, enforce, encrypt)`` says that traffic from an identity matching ``source``
to an identity matching ``destination`` requires authentication, checked at the destination's ingress
(``"ingress"``), at the source's egress (``"egress"``) or at both.

``encrypt = "ktls"`` asks more: each TCP connection of the pair runs in a TLS 1.3 session of its own,
keyed from the two workloads' SVIDs, with the record crypto in kernel TLS. Both ends need an SVID, so
neither side may be ``*`` (the world has none). The datapath never passes such a pair in clear: until
this node can carry it in kTLS (kernel TLS and the transparent capture), its packets are dropped with
their own reason (:mod:`authd.ktls`). Where two rules cover the same pair, ``ktls`` wins.
"""

from __future__ import annotations

import enum
import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from types import MappingProxyType
from typing import Literal

from authd.errors import SpiffeIdError
from authd.identity import Selector, SpiffeId

IpAddress = IPv4Address | IPv6Address
IpNetwork = IPv4Network | IPv6Network

Enforce = Literal["ingress", "egress", "both"]
"""Where a rule is enforced: the destination's ingress, the source's egress, or both."""

Encrypt = Literal["none", "ktls"]
"""What a rule asks beyond authentication: nothing, or kernel TLS per TCP connection."""

WILDCARD = "*"


@dataclass(frozen=True, slots=True)
class Node:
    """A node running authd: its name, addresses in preference order, node SPIFFE ID, attestation port.

    ``attest_port`` overrides the cluster-wide attestation port for this node; None means the default.
    ``agent_id`` is the SPIFFE ID of the node's SPIRE agent, the parent of its workloads' registration
    entries; None means ``spiffe://<trust domain>/spire/agent/<name>`` (see :meth:`spire_agent_id`).
    """

    name: str
    addresses: tuple[IpAddress, ...]
    spiffe_id: SpiffeId
    attest_port: int | None = None
    agent_id: SpiffeId | None = None

    def spire_agent_id(self) -> SpiffeId:
        """The parent ID of this node's registration entries."""
        if self.agent_id is not None:
            return self.agent_id
        return SpiffeId.from_parts(self.spiffe_id.trust_domain, f"/spire/agent/{self.name}")


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A workload: its SPIFFE ID, the node hosting it, its addresses and its SPIRE selectors on that node."""

    spiffe_id: SpiffeId
    node: str
    prefixes: tuple[IpNetwork, ...]
    selectors: tuple[Selector, ...]


class PatternKind(enum.Enum):
    """The three shapes of identity pattern."""

    EXACT = "exact"
    UNDER = "under"
    ANY = "any"


@dataclass(frozen=True, slots=True)
class IdentityPattern:
    """A set of identities named in policy (see the module docstring for the grammar).

    ``base`` is the ID itself for EXACT, the ID the matches lie strictly under for UNDER (a bare trust
    domain ID for ``spiffe://td/*``), and None for ANY.
    """

    kind: PatternKind
    base: SpiffeId | None = None

    @classmethod
    def parse(cls, text: str) -> IdentityPattern:
        """Parse ``*``, ``spiffe://td/*``, ``spiffe://td/path/*`` or an exact SPIFFE ID."""
        if text == WILDCARD:
            return cls(PatternKind.ANY)
        if text.endswith("/" + WILDCARD):
            base_text = text[: -len(WILDCARD) - 1]
            if not base_text or WILDCARD in base_text:
                raise SpiffeIdError("pattern: '*' may only stand alone or be the whole last path segment")
            return cls(PatternKind.UNDER, SpiffeId.parse(base_text))
        if WILDCARD in text:
            raise SpiffeIdError("pattern: '*' may only stand alone or be the whole last path segment")
        spiffe_id = SpiffeId.parse(text)
        if spiffe_id.is_root:
            raise SpiffeIdError(
                f"pattern: names a trust domain, not a workload (for all of it write {text}/*)"
            )
        return cls(PatternKind.EXACT, spiffe_id)

    @classmethod
    def exact(cls, spiffe_id: SpiffeId) -> IdentityPattern:
        """The pattern matching exactly ``spiffe_id``."""
        return cls(PatternKind.EXACT, spiffe_id)

    @property
    def is_any(self) -> bool:
        """Whether this is ``*``, which also matches the world."""
        return self.kind is PatternKind.ANY

    def matches(self, spiffe_id: SpiffeId | None) -> bool:
        """Whether ``spiffe_id`` matches; None stands for the world (an address not in cluster state)."""
        if self.kind is PatternKind.ANY:
            return True
        if spiffe_id is None or self.base is None:
            return False
        if self.kind is PatternKind.EXACT:
            return spiffe_id == self.base
        return spiffe_id.trust_domain == self.base.trust_domain and spiffe_id.path.startswith(
            self.base.path + "/"
        )

    def __str__(self) -> str:
        """Return the pattern as written in policy."""
        if self.kind is PatternKind.ANY:
            return WILDCARD
        if self.kind is PatternKind.UNDER:
            return f"{self.base}/{WILDCARD}"
        return str(self.base)


@dataclass(frozen=True, slots=True)
class PolicyRule:
    """Traffic from ``source`` to ``destination`` requires authentication, enforced where ``enforce`` says.

    ``encrypt``: ``"ktls"`` also requires kernel TLS for the pair's TCP connections (module docstring).
    """

    source: IdentityPattern
    destination: IdentityPattern
    enforce: Enforce = "ingress"
    encrypt: Encrypt = "none"

    @property
    def at_ingress(self) -> bool:
        """Whether the destination's node checks this rule on ingress."""
        return self.enforce in ("ingress", "both")

    @property
    def at_egress(self) -> bool:
        """Whether the source's node checks this rule on egress."""
        return self.enforce in ("egress", "both")


class ClusterState:
    """An immutable snapshot of cluster state with its lookups; ``version`` is a digest of the content.

    Endpoints and rules keep the order the source gave them (problems and logs refer to it).

    Equal content gives an equal version whatever the order it was written in, except for each node's
    address order, which is a preference and so part of the content.
    """

    __slots__ = (
        "_by_id",
        "_endpoints",
        "_endpoints_by_id",
        "_endpoints_by_node",
        "_nodes",
        "_rules",
        "_version",
    )

    def __init__(
        self, nodes: Iterable[Node], endpoints: Iterable[Endpoint], rules: Iterable[PolicyRule]
    ) -> None:
        """Index already-validated content (use ``validation.build_state`` for content from outside)."""
        self._nodes: dict[str, Node] = {node.name: node for node in sorted(nodes, key=lambda n: n.name)}
        self._by_id: dict[SpiffeId, Node] = {node.spiffe_id: node for node in self._nodes.values()}
        self._endpoints = tuple(endpoints)
        self._rules = tuple(rules)
        by_node: dict[str, list[Endpoint]] = {}
        by_id: dict[SpiffeId, list[Endpoint]] = {}
        for endpoint in self._endpoints:
            by_node.setdefault(endpoint.node, []).append(endpoint)
            by_id.setdefault(endpoint.spiffe_id, []).append(endpoint)
        self._endpoints_by_node = {name: tuple(eps) for name, eps in by_node.items()}
        self._endpoints_by_id = {spiffe_id: tuple(eps) for spiffe_id, eps in by_id.items()}
        self._version = _digest(self._nodes.values(), self._endpoints, self._rules)

    @property
    def version(self) -> str:
        """SHA-256 (hex) of the content."""
        return self._version

    @property
    def nodes(self) -> Mapping[str, Node]:
        """Nodes by name, in name order (read-only)."""
        return MappingProxyType(self._nodes)

    @property
    def endpoints(self) -> tuple[Endpoint, ...]:
        """All endpoints, in the order the source listed them."""
        return self._endpoints

    @property
    def rules(self) -> tuple[PolicyRule, ...]:
        """All policy rules, in the order the source listed them."""
        return self._rules

    def node(self, name: str) -> Node | None:
        """The node called ``name``."""
        return self._nodes.get(name)

    def node_by_id(self, spiffe_id: SpiffeId) -> Node | None:
        """The node whose authd runs as ``spiffe_id``."""
        return self._by_id.get(spiffe_id)

    def endpoints_on(self, node: str) -> tuple[Endpoint, ...]:
        """The endpoints hosted on node ``node``."""
        return self._endpoints_by_node.get(node, ())

    def endpoint_for(self, spiffe_id: SpiffeId) -> tuple[Endpoint, ...]:
        """Every endpoint with identity ``spiffe_id`` (one identity may run on several nodes)."""
        return self._endpoints_by_id.get(spiffe_id, ())

    @property
    def identities(self) -> frozenset[SpiffeId]:
        """The SPIFFE IDs of all endpoints."""
        return frozenset(self._endpoints_by_id)

    def where(self, spiffe_id: SpiffeId) -> tuple[Node, ...]:
        """The nodes hosting an endpoint with identity ``spiffe_id``, in name order."""
        names = sorted({endpoint.node for endpoint in self.endpoint_for(spiffe_id)})
        return tuple(self._nodes[name] for name in names)

    def matching(self, pattern: IdentityPattern) -> frozenset[SpiffeId]:
        """The known identities ``pattern`` matches (``*`` gives all of them; the world is not listed)."""
        if pattern.kind is PatternKind.EXACT:
            base = pattern.base
            return frozenset({base}) if base is not None and base in self._endpoints_by_id else frozenset()
        return frozenset(spiffe_id for spiffe_id in self._endpoints_by_id if pattern.matches(spiffe_id))

    def __eq__(self, other: object) -> bool:
        """Snapshots are equal when their content is."""
        return isinstance(other, ClusterState) and other.version == self.version

    def __hash__(self) -> int:
        """Hash by content."""
        return hash(self.version)

    def __repr__(self) -> str:
        """Summarise the snapshot."""
        return (
            f"ClusterState(version={self.version[:12]}, nodes={len(self._nodes)}, "
            f"endpoints={len(self.endpoints)}, rules={len(self.rules)})"
        )


def _digest(nodes: Iterable[Node], endpoints: Iterable[Endpoint], rules: Iterable[PolicyRule]) -> str:
    """SHA-256 over a canonical JSON form: order-free except for node address preference."""
    content = {
        "nodes": sorted(
            [n.name, [str(a) for a in n.addresses], str(n.spiffe_id), n.attest_port, str(n.agent_id or "")]
            for n in nodes
        ),
        "endpoints": sorted(
            [
                str(e.spiffe_id),
                e.node,
                sorted(str(p) for p in e.prefixes),
                sorted(str(s) for s in e.selectors),
            ]
            for e in endpoints
        ),
        "rules": sorted({(str(r.source), str(r.destination), r.enforce, r.encrypt) for r in rules}),
    }
    return hashlib.sha256(json.dumps(content, separators=(",", ":")).encode()).hexdigest()
