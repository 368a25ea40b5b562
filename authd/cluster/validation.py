"""Cross-checks of cluster state content, and the one checked way to build a :class:`ClusterState`.

Each problem names the item the way the cluster file does (``endpoint[2].node: unknown node "node-c"``),
so an operator can find it; every other source (etcd, later) presents its content as the same three
ordered lists. What is checked, and why an operator gets it wrong:

- node names and node SPIFFE IDs are unique (copy-pasted ``[[node]]`` blocks);
- a node address belongs to one node, and is a usable unicast address (not ``0.0.0.0`` or multicast);
- an endpoint names a node that exists (typos, renamed or removed nodes);
- an endpoint's identity is not a node identity: node SVIDs authenticate nodes to each other, and a
  workload holding one could pose as a node;
- an address belongs to at most one endpoint: prefixes of different endpoints (or of the same one) never
  overlap, because the datapath must resolve each address to exactly one identity;
- an endpoint prefix contains no node address, or node-to-node traffic (attestation itself) would be
  classified as that workload and could be blocked by its policy;
- an endpoint prefix is not IPv4-mapped IPv6 (``::ffff:10.1.0.5``): packets carry the IPv4 form;
- an endpoint lists each selector once, and the same (identity, node, selectors) appears only once;
- a rule with ``encrypt = "ktls"`` names no ``*`` side: a kTLS session is keyed from the SVIDs of both
  workloads, and the world (an address not in cluster state) has none.
"""

from __future__ import annotations

import bisect
import difflib
import ipaddress
from collections.abc import Sequence

from authd.cluster.model import ClusterState, Endpoint, IpAddress, IpNetwork, Node, PolicyRule
from authd.errors import ClusterStateError
from authd.identity import SpiffeId

_V4_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")


def build_state(
    nodes: Sequence[Node], endpoints: Sequence[Endpoint], rules: Sequence[PolicyRule]
) -> ClusterState:
    """Check the content and build a snapshot; raise ClusterStateError listing every problem."""
    found = problems(nodes, endpoints, rules)
    if found:
        raise ClusterStateError(f"cluster: {len(found)} problem(s) in cluster state", found)
    return ClusterState(nodes, endpoints, rules)


def problems(nodes: Sequence[Node], endpoints: Sequence[Endpoint], rules: Sequence[PolicyRule]) -> list[str]:
    """Every inconsistency in the content: grouped by check, each group in document order."""
    found: list[str] = []
    _check_nodes(nodes, found)
    _check_endpoints(nodes, endpoints, found)
    _check_prefixes(nodes, endpoints, found)
    _check_rules(rules, found)
    return found


def _check_rules(rules: Sequence[PolicyRule], found: list[str]) -> None:
    """Patterns are validated when parsed, and a rule matching nothing yet is legitimate; kTLS needs SVIDs."""
    for index, rule in enumerate(rules):
        if rule.encrypt != "ktls":
            continue
        for side, pattern in (("source", rule.source), ("destination", rule.destination)):
            if pattern.is_any:
                found.append(
                    f'policy[{index}].encrypt: "ktls" needs an SVID at both ends, but {side} "*" includes '
                    "addresses not in cluster state; name the workloads (spiffe://<trust domain>/* for all)"
                )


def _check_nodes(nodes: Sequence[Node], found: list[str]) -> None:
    names: dict[str, int] = {}
    ids: dict[SpiffeId, int] = {}
    owners: dict[IpAddress, int] = {}
    for index, node in enumerate(nodes):
        where = f"node[{index}]"
        if node.name in names:
            found.append(f'{where}.name: duplicate node name "{node.name}" (also node[{names[node.name]}])')
        names.setdefault(node.name, index)
        if node.spiffe_id in ids:
            found.append(
                f'{where}.spiffe_id: "{node.spiffe_id}" is already the ID of node[{ids[node.spiffe_id]}]'
            )
        ids.setdefault(node.spiffe_id, index)
        if node.spiffe_id.is_root:
            found.append(f'{where}.spiffe_id: "{node.spiffe_id}" names a trust domain, not a node')
        if not node.addresses:
            found.append(f"{where}.addresses: must list at least one address")
        for position, address in enumerate(node.addresses):
            if address.is_unspecified or address.is_multicast:
                found.append(f"{where}.addresses[{position}]: {address} is not a unicast address")
            owner = owners.setdefault(address, index)
            if owner != index:
                found.append(f"{where}.addresses[{position}]: {address} is also an address of node[{owner}]")
            elif address in node.addresses[:position]:
                found.append(f"{where}.addresses[{position}]: {address} is listed twice")


def _check_endpoints(nodes: Sequence[Node], endpoints: Sequence[Endpoint], found: list[str]) -> None:
    node_names = [node.name for node in nodes]
    known_nodes = set(node_names)
    node_ids = {node.spiffe_id: index for index, node in enumerate(nodes)}
    seen: dict[tuple[SpiffeId, str, frozenset[str]], int] = {}
    for index, endpoint in enumerate(endpoints):
        where = f"endpoint[{index}]"
        if endpoint.spiffe_id.is_root:
            found.append(f'{where}.spiffe_id: "{endpoint.spiffe_id}" names a trust domain, not a workload')
        if endpoint.spiffe_id in node_ids:
            found.append(
                f'{where}.spiffe_id: "{endpoint.spiffe_id}" is the node identity of '
                f"node[{node_ids[endpoint.spiffe_id]}]; a workload needs its own"
            )
        if endpoint.node not in known_nodes:
            close = difflib.get_close_matches(endpoint.node, node_names, n=1, cutoff=0.6)
            hint = f' (did you mean "{close[0]}"?)' if close else ""
            found.append(f'{where}.node: unknown node "{endpoint.node}"{hint}')
        _check_lists(where, endpoint, found)
        key = (endpoint.spiffe_id, endpoint.node, frozenset(str(s) for s in endpoint.selectors))
        if key in seen:
            found.append(f"{where}: same spiffe_id, node and selectors as endpoint[{seen[key]}]")
        seen.setdefault(key, index)


def _check_lists(where: str, endpoint: Endpoint, found: list[str]) -> None:
    """An endpoint's own prefixes and selectors."""
    if not endpoint.prefixes:
        found.append(f"{where}.prefixes: must list at least one address or prefix")
    for position, prefix in enumerate(endpoint.prefixes):
        if isinstance(prefix, ipaddress.IPv6Network) and prefix.subnet_of(_V4_MAPPED):
            # Packets carry the IPv4 form; an IPv4-mapped entry would never match one.
            found.append(f"{where}.prefixes[{position}]: {prefix} is IPv4-mapped; write the IPv4 form")
    if not endpoint.selectors:
        found.append(f"{where}.selectors: must list at least one SPIRE selector")
    selectors = [str(s) for s in endpoint.selectors]
    for position, selector in enumerate(selectors):
        if selector in selectors[:position]:
            found.append(f'{where}.selectors[{position}]: "{selector}" is listed twice')


def _check_prefixes(nodes: Sequence[Node], endpoints: Sequence[Endpoint], found: list[str]) -> None:
    claims: list[tuple[int, int, int, int, str, IpNetwork]] = []  # version, first, -size, last, where, net
    for index, endpoint in enumerate(endpoints):
        for position, prefix in enumerate(endpoint.prefixes):
            first, last = int(prefix.network_address), int(prefix.broadcast_address)
            where = f"endpoint[{index}].prefixes[{position}]"
            claims.append((prefix.version, first, first - last, last, where, prefix))
    # CIDR blocks are nested or disjoint. Sorted by start (widest first), a block overlaps an earlier one
    # exactly when it starts before the furthest end seen so far, and then it lies inside that block.
    claims.sort(key=lambda claim: claim[:3])
    widest: tuple[int, int, int, int, str, IpNetwork] | None = None
    overlaps: list[tuple[tuple[int, int], str]] = []
    for claim in claims:
        if widest is not None and widest[0] == claim[0] and claim[1] <= widest[3]:
            earlier, later = sorted([widest, claim], key=lambda c: _order(c[4]))
            verb = "is also claimed by" if earlier[5] == later[5] else "overlaps"
            overlaps.append((_order(later[4]), f"{later[4]}: {later[5]} {verb} {earlier[4]} ({earlier[5]})"))
        if widest is None or widest[0] != claim[0] or claim[3] > widest[3]:
            widest = claim
    found.extend(message for _, message in sorted(overlaps))
    addresses = sorted(
        (address.version, int(address), index, address)
        for index, node in enumerate(nodes)
        for address in node.addresses
    )
    for claim in sorted(claims, key=lambda c: _order(c[4])):
        version, first, _, last, where, prefix = claim
        start = bisect.bisect_left(addresses, (version, first))
        for address_version, value, index, address in addresses[start:]:
            if address_version != version or value > last:
                break
            found.append(
                f'{where}: {prefix} contains address {address} of node[{index}] ("{nodes[index].name}")'
            )


def _order(where: str) -> tuple[int, int]:
    """Document order of ``endpoint[i].prefixes[j]``."""
    index, position = (int(part.split("]")[0]) for part in where.split("[")[1:])
    return index, position
