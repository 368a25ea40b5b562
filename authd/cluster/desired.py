"""The datapath state this node should have, computed from cluster state; pure functions.

Three outputs, each a plain value the auth manager diffs against what the pinned maps hold:

- the **ipcache**: every endpoint prefix in the cluster -> (identity handle, node handle), node handle 0
  for endpoints on this node;
- the **policy map** of this node: ``(local, remote, direction) -> auth type`` for each local identity and
  each rule that applies to it on the side this node enforces (ingress rules whose destination matches it,
  egress rules whose source matches it). A remote side of ``*`` is one wildcard entry (remote :data:`ANY`),
  never one entry per identity; narrower patterns expand to the known identities they match, and
  specific entries that a wildcard entry of the same local identity and direction already covers are left
  out. The auth type is SPIRE, or KTLS for a rule with ``encrypt = "ktls"``; where several rules cover a
  key the strictest wins, and a specific entry is never weaker than the wildcard entry it shadows (the
  datapath looks up the specific key first, so a weaker one would let a kTLS pair through in clear);
- the **auth pairs**: every (local identity, remote identity, remote node) that policy needs an auth entry
  for, with each node that hosts the remote identity. A pair whose remote identity runs on this node needs
  no handshake (this node holds both SVIDs) and is marked ``on_local_node``. ``*`` expands here to every
  known identity, so that known peers are authenticated before their first packet.

Handles come from a :class:`HandleLookup` (the registry); assign them for the whole state first
(``registry.assign(state.identities, state.nodes)``), these functions never allocate.

Keys and values are the datapath's own types (:mod:`authd.datapath`), the mirror of its C header.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

from authd.cluster.model import ClusterState, IdentityPattern, IpNetwork
from authd.datapath.layout import IDENTITY_ANY, NODE_LOCAL, AuthType, Direction
from authd.datapath.maps import IpcacheEntry, PolicyKey
from authd.errors import ClusterStateError
from authd.identity import SpiffeId

ANY = IDENTITY_ANY
"""The remote-identity wildcard of the policy map."""
LOCAL_NODE = NODE_LOCAL


@dataclass(frozen=True, slots=True)
class AuthPair:
    """A pair policy needs an auth entry for: local identity, remote identity, and a node hosting it.

    The auth map key is (``local_handle``, ``remote_handle``, ``node_handle``, SPIRE). ``on_local_node``
    pairs need no handshake; the others need an attestation of ``remote`` at ``node``.
    """

    local: SpiffeId
    remote: SpiffeId
    node: str
    local_handle: int
    remote_handle: int
    node_handle: int

    @property
    def on_local_node(self) -> bool:
        """Whether the remote identity runs on this node (both SVIDs are held here)."""
        return self.node_handle == LOCAL_NODE


@dataclass(frozen=True, slots=True)
class DesiredState:
    """Everything this node's datapath should hold for one cluster-state version."""

    version: str
    ipcache: Mapping[IpNetwork, IpcacheEntry]
    policy: Mapping[PolicyKey, AuthType]
    pairs: frozenset[AuthPair]


class HandleLookup(Protocol):
    """The handles the computation reads (implemented by ``handles.HandleRegistry``)."""

    def identity_handle(self, spiffe_id: SpiffeId) -> int | None:
        """The handle of ``spiffe_id``, if assigned."""
        ...

    def node_handle(self, name: str) -> int | None:
        """The handle of node ``name`` (0 for this node), if assigned."""
        ...


def desired_state(state: ClusterState, local_node: str, handles: HandleLookup) -> DesiredState:
    """Compute all three outputs for ``local_node``."""
    return DesiredState(
        version=state.version,
        ipcache=ipcache(state, local_node, handles),
        policy=policy(state, local_node, handles),
        pairs=auth_pairs(state, local_node, handles),
    )


def ipcache(state: ClusterState, local_node: str, handles: HandleLookup) -> dict[IpNetwork, IpcacheEntry]:
    """Every endpoint prefix -> (identity handle, node handle); node handle 0 on this node."""
    entries: dict[IpNetwork, IpcacheEntry] = {}
    for endpoint in state.endpoints:
        node = LOCAL_NODE if endpoint.node == local_node else _node(handles, endpoint.node)
        entry = IpcacheEntry(_identity(handles, endpoint.spiffe_id), node)
        for prefix in endpoint.prefixes:
            entries[prefix] = entry
    return entries


def policy(state: ClusterState, local_node: str, handles: HandleLookup) -> dict[PolicyKey, AuthType]:
    """The policy map entries of ``local_node`` (see the module docstring)."""
    wanted: dict[tuple[int, int, Direction], AuthType] = {}

    def want(key: tuple[int, int, Direction], auth_type: AuthType) -> None:
        wanted[key] = max(wanted.get(key, AuthType.NONE), auth_type, key=_STRICTNESS.index)

    matching = _Matcher(state)
    for local, remote_pattern, direction, auth_type in _local_sides(state, local_node):
        local_handle = _identity(handles, local)
        if remote_pattern.is_any:
            want((local_handle, ANY, direction), auth_type)
        else:
            for remote in matching(remote_pattern):
                want((local_handle, _identity(handles, remote), direction), auth_type)
    wildcards = {(key[0], key[2]): value for key, value in wanted.items() if key[1] == ANY}
    entries: dict[PolicyKey, AuthType] = {}
    for (local_handle, remote_handle, direction), auth_type in wanted.items():
        shadowed = wildcards.get((local_handle, direction))
        if (
            remote_handle != ANY
            and shadowed is not None
            and _STRICTNESS.index(shadowed) >= _STRICTNESS.index(auth_type)
        ):
            continue  # the wildcard entry already asks as much
        entries[PolicyKey(local_handle, remote_handle, direction)] = auth_type
    return entries


def auth_pairs(state: ClusterState, local_node: str, handles: HandleLookup) -> frozenset[AuthPair]:
    """Every (local identity, remote identity, hosting node) that needs an auth entry on ``local_node``."""
    pairs: set[AuthPair] = set()
    remotes_of: dict[SpiffeId, set[SpiffeId]] = {}
    matching = _Matcher(state)
    for local, remote_pattern, _, _ in _local_sides(state, local_node):
        remotes_of.setdefault(local, set()).update(matching(remote_pattern))
    # Where each remote runs, with its handles, is the same for every local identity: look it up once.
    hosts: dict[SpiffeId, list[tuple[int, str, int]]] = {}
    for remote in set().union(*remotes_of.values()):
        remote_handle = _identity(handles, remote)
        hosts[remote] = [
            (remote_handle, node.name, LOCAL_NODE if node.name == local_node else _node(handles, node.name))
            for node in state.where(remote)
        ]
    for local, remotes in remotes_of.items():
        local_handle = _identity(handles, local)
        for remote in remotes:
            for remote_handle, node_name, node_handle in hosts[remote]:
                pairs.add(AuthPair(local, remote, node_name, local_handle, remote_handle, node_handle))
    return frozenset(pairs)


def attestations(pairs: Iterable[AuthPair]) -> frozenset[tuple[SpiffeId, str]]:
    """The handshakes the pairs need: one per (remote identity, remote node), none for this node."""
    return frozenset((pair.remote, pair.node) for pair in pairs if not pair.on_local_node)


_STRICTNESS = (AuthType.NONE, AuthType.SPIRE, AuthType.KTLS)
"""Auth types from the least to the most demanding."""

_Side = tuple[SpiffeId, IdentityPattern, Direction, AuthType]


def _local_sides(state: ClusterState, local_node: str) -> list[_Side]:
    """(local identity, pattern of the remote side, direction, auth type) for each rule this node enforces."""
    local_ids = sorted({endpoint.spiffe_id for endpoint in state.endpoints_on(local_node)})
    sides: list[_Side] = []
    for rule in state.rules:
        auth_type = AuthType.KTLS if rule.encrypt == "ktls" else AuthType.SPIRE
        for local in local_ids:
            if rule.at_ingress and rule.destination.matches(local):
                sides.append((local, rule.source, Direction.INGRESS, auth_type))
            if rule.at_egress and rule.source.matches(local):
                sides.append((local, rule.destination, Direction.EGRESS, auth_type))
    return sides


class _Matcher:
    """``state.matching`` remembered per pattern: rules repeat patterns across many local identities."""

    def __init__(self, state: ClusterState) -> None:
        self._state = state
        self._known: dict[IdentityPattern, frozenset[SpiffeId]] = {}

    def __call__(self, pattern: IdentityPattern) -> frozenset[SpiffeId]:
        found = self._known.get(pattern)
        if found is None:
            found = self._known[pattern] = self._state.matching(pattern)
        return found


def _identity(handles: HandleLookup, spiffe_id: SpiffeId) -> int:
    handle = handles.identity_handle(spiffe_id)
    if handle is None:
        raise ClusterStateError(
            f"desired: no handle assigned to {spiffe_id}; assign handles for the state first"
        )
    return handle


def _node(handles: HandleLookup, name: str) -> int:
    handle = handles.node_handle(name)
    if handle is None:
        raise ClusterStateError(
            f'desired: no handle assigned to node "{name}"; assign handles for the state first'
        )
    return handle
