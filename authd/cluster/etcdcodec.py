"""How cluster state is stored in etcd: encoding version 1, one key per node, endpoint and policy rule.

Under the configured prefix ``P`` (``/authd/cluster/`` by default)::

    P v1/node/<name>                             one [[node]] table
    P v1/endpoint/<node>/<quoted SPIFFE ID>      one [[endpoint]] table (a second one for the same
                                                 identity and node gets the suffix ~2, ~3, ...)
    P v1/policy/<quoted source>/<quoted dest>    one [[policy]] table

Each value is a JSON object with exactly the keys of the cluster file's table of that kind (see
``config/cluster.example.toml``), UTF-8. A node's value always carries its ``spiffe_id`` (the file's
top-level ``trust_domain`` is resolved on push). Keys are identifiers only: the content is the value, and
a node key whose name differs from its value's ``name`` is a problem. Keys under ``P`` that do not start
with ``v1/`` belong to other encoding versions and are ignored, so a later version can be written next to
this one during an upgrade. Values are decoded and validated exactly as the file's tables are
(:func:`authd.cluster.file.state_from_tables`); problems name the etcd key at fault.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import quote

from authd.cluster.file import state_from_tables
from authd.cluster.model import ClusterState, Endpoint, Node, PolicyRule
from authd.errors import ClusterStateError
from authd.identity import node_id

VERSION = "v1/"
KINDS = {"node": "node", "endpoint": "endpoint", "policy": "policy"}
"""The key segment of each kind, and the cluster file's table it holds."""

_INDEXED = re.compile(r"\b(node|endpoint|policy)\[(\d+)\](\.)?")


def decode_state(items: Mapping[str, bytes], *, origin: str) -> ClusterState:
    """Build a state from the keys under the prefix (``items``: key relative to the prefix -> value).

    Raise ClusterStateError whose problems name the keys; ``origin`` names the store in messages.
    """
    tables: dict[str, list[Any]] = {"node": [], "endpoint": [], "policy": []}
    keys: dict[str, list[str]] = {"node": [], "endpoint": [], "policy": []}
    problems: list[str] = []
    for key in sorted(items):
        if not key.startswith(VERSION):
            continue
        kind = key[len(VERSION) :].split("/", 1)[0]
        if kind not in tables:
            problems.append(f"{key}: unknown kind {kind!r} (expected node, endpoint or policy)")
            continue
        try:
            value = json.loads(items[key].decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as err:
            problems.append(f"{key}: not a UTF-8 JSON object: {err}")
            continue
        if not isinstance(value, dict):
            problems.append(f"{key}: not a JSON object")
            continue
        if kind == "node" and value.get("name") != key[len(VERSION) + len("node/") :]:
            problems.append(
                f"{key}: the key names node {key.rsplit('/', 1)[-1]!r}, the value {value.get('name')!r}"
            )
            continue
        tables[kind].append(value)
        keys[kind].append(key)
    if problems:
        raise ClusterStateError(f"cluster: {len(problems)} problem(s) in {origin}", problems)
    try:
        return state_from_tables(tables, source=origin)
    except ClusterStateError as err:
        named = [_name_key(problem, keys) for problem in err.problems]
        raise ClusterStateError(f"cluster: {len(named)} problem(s) in {origin}", named) from err


def _name_key(problem: str, keys: Mapping[str, list[str]]) -> str:
    """``endpoint[2].node: ...`` -> ``v1/endpoint/node-a/<id> node: ...``, also where a message cites one."""

    def key_of(match: re.Match[str]) -> str:
        listed = keys[match.group(1)]
        index = int(match.group(2))
        if index >= len(listed):
            return match.group(0)
        return listed[index] + (" " if match.group(3) else "")

    return _INDEXED.sub(key_of, problem)


def encode_state(state: ClusterState) -> dict[str, bytes]:
    """The keys (relative to the prefix) and values that store ``state``."""
    items: dict[str, bytes] = {}
    for node in state.nodes.values():
        items[f"{VERSION}node/{node.name}"] = _json(node_table(node))
    for endpoint in state.endpoints:
        base = f"{VERSION}endpoint/{endpoint.node}/{quote(str(endpoint.spiffe_id), safe='')}"
        key, count = base, 1
        while key in items:
            count += 1
            key = f"{base}~{count}"
        items[key] = _json(endpoint_table(endpoint))
    for rule in state.rules:
        key = f"{VERSION}policy/{quote(str(rule.source), safe='')}/{quote(str(rule.destination), safe='')}"
        if key in items:
            raise ClusterStateError(
                f"cluster: two policy rules from {rule.source} to {rule.destination}; merge them "
                '(enforce = "both")'
            )
        items[key] = _json(policy_table(rule))
    return items


def node_table(node: Node) -> dict[str, Any]:
    """A node as the cluster file's [[node]] table, with its SPIFFE ID spelled out."""
    table: dict[str, Any] = {
        "name": node.name,
        "addresses": [str(a) for a in node.addresses],
        "spiffe_id": str(node.spiffe_id),
    }
    if node.attest_port is not None:
        table["attest_port"] = node.attest_port
    if node.agent_id is not None:
        table["agent_id"] = str(node.agent_id)
    return table


def endpoint_table(endpoint: Endpoint) -> dict[str, Any]:
    """An endpoint as the cluster file's [[endpoint]] table."""
    return {
        "spiffe_id": str(endpoint.spiffe_id),
        "node": endpoint.node,
        "prefixes": [_prefix(p) for p in endpoint.prefixes],
        "selectors": [str(s) for s in endpoint.selectors],
    }


def policy_table(rule: PolicyRule) -> dict[str, Any]:
    """A rule as the cluster file's [[policy]] table (``encrypt`` only when it asks for something)."""
    table: dict[str, Any] = {
        "source": str(rule.source),
        "destination": str(rule.destination),
        "enforce": rule.enforce,
    }
    if rule.encrypt != "none":
        table["encrypt"] = rule.encrypt
    return table


def _prefix(prefix: Any) -> str:  # noqa: ANN401 - an IPv4Network or IPv6Network
    """A host prefix as its bare address, as the file writes it."""
    if prefix.prefixlen == prefix.max_prefixlen:
        return str(prefix.network_address)
    return str(prefix)


def _json(table: Mapping[str, Any]) -> bytes:
    return json.dumps(table, separators=(",", ":"), sort_keys=True).encode()


def render_toml(state: ClusterState) -> str:
    """``state`` as a cluster file (``authd cluster export``); parsing it gives the same version."""
    lines: list[str] = []
    trust_domain = _common_trust_domain(state.nodes.values())
    if trust_domain is not None:
        lines += [f"trust_domain = {_toml(trust_domain)}", ""]
    for node in state.nodes.values():
        table = node_table(node)
        if trust_domain is not None:
            del table["spiffe_id"]
        lines += _table("node", table)
    for endpoint in state.endpoints:
        lines += _table("endpoint", endpoint_table(endpoint))
    for rule in state.rules:
        lines += _table("policy", policy_table(rule))
    return "\n".join(lines).rstrip() + "\n"


def _common_trust_domain(nodes: Iterable[Node]) -> str | None:
    """The trust domain every node ID derives from by name, if there is one."""
    listed = list(nodes)
    if not listed:
        return None
    domain = listed[0].spiffe_id.trust_domain
    if all(n.spiffe_id == node_id(domain, n.name) for n in listed):
        return str(domain.name)
    return None


def _table(kind: str, table: Mapping[str, Any]) -> list[str]:
    return [f"[[{kind}]]", *(f"{key} = {_toml(value)}" for key, value in table.items()), ""]


def _toml(value: Any) -> str:  # noqa: ANN401 - a string, an integer or a list of strings
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, int):
        return str(value)
    return json.dumps(value)  # a TOML basic string is a JSON string for the characters we store
