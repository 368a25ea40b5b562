from __future__ import annotations

import ipaddress
import re
from pathlib import Path

import pytest

from authd.cluster.desired import (
    ANY,
    AuthPair,
    attestations,
    auth_pairs,
    desired_state,
    ipcache,
    policy,
)
from authd.cluster.handles import HandleRegistry
from authd.cluster.model import ClusterState, PolicyRule
from authd.datapath import AuthType, Direction, IpcacheEntry, PolicyKey
from authd.errors import ClusterStateError
from authd.identity import SpiffeId
from tests.fakes.cluster import endpoint, node, rule, sid, state

LOCAL = "node-a"


class World:
    """A cluster state with handles assigned, as the auth manager would hold them."""

    def __init__(self, tmp_path: Path, cluster: ClusterState, local: str = LOCAL) -> None:
        self.cluster = cluster
        self.local = local
        self.handles = HandleRegistry.open(tmp_path / "handles.json", local)
        self.handles.assign(cluster.identities, cluster.nodes)

    def h(self, path: str) -> int:
        handle = self.handles.identity_handle(sid(path))
        assert handle is not None
        return handle

    def n(self, name: str) -> int:
        handle = self.handles.node_handle(name)
        assert handle is not None
        return handle

    def policy(self) -> dict[tuple[str, str, Direction], AuthType]:
        """The policy map with handles turned back into short names (ANY as "*")."""
        named: dict[tuple[str, str, Direction], AuthType] = {}
        for key, value in policy(self.cluster, self.local, self.handles).items():
            remote = "*" if key.remote == ANY else self._name(key.remote)
            named[(self._name(key.local), remote, key.direction)] = value
        return named

    def pairs(self) -> set[tuple[str, str, str, bool]]:
        return {
            (self._short(p.local), self._short(p.remote), p.node, p.on_local_node)
            for p in auth_pairs(self.cluster, self.local, self.handles)
        }

    def _name(self, handle: int) -> str:
        name = self.handles.identity_name(handle)
        assert name is not None
        return self._short(SpiffeId.parse(name))

    @staticmethod
    def _short(spiffe_id: SpiffeId) -> str:
        return spiffe_id.path.lstrip("/")


def three_nodes(*endpoints_: object, rules: list[PolicyRule]) -> ClusterState:
    eps = [e for e in endpoints_ if not isinstance(e, PolicyRule)]
    return state([node("node-a"), node("node-b"), node("node-c")], eps, rules)  # type: ignore[arg-type]


IN, OUT = Direction.INGRESS, Direction.EGRESS
SPIRE, KTLS = AuthType.SPIRE, AuthType.KTLS


def test_enum_values_match_the_datapath_contract() -> None:
    assert (Direction.INGRESS, Direction.EGRESS, AuthType.SPIRE, ANY) == (1, 2, 1, 0xFFFFFFFF)
    assert PolicyKey(1, 2, IN) == PolicyKey(local=1, remote=2, direction=IN)
    assert IpcacheEntry(identity=256, node=0).node == 0


def test_ipcache_maps_every_prefix_with_node_zero_for_local(tmp_path: Path) -> None:
    world = World(
        tmp_path,
        three_nodes(
            endpoint("web", "node-a", "10.1.0.1", "fd00:1::1"),
            endpoint("web", "node-b", "10.2.0.1"),
            endpoint("db", "node-c", "10.3.0.0/28"),
            rules=[],
        ),
    )
    entries = ipcache(world.cluster, LOCAL, world.handles)
    net = ipaddress.ip_network
    assert entries == {
        net("10.1.0.1/32"): IpcacheEntry(world.h("web"), 0),
        net("fd00:1::1/128"): IpcacheEntry(world.h("web"), 0),
        net("10.2.0.1/32"): IpcacheEntry(world.h("web"), world.n("node-b")),
        net("10.3.0.0/28"): IpcacheEntry(world.h("db"), world.n("node-c")),
    }
    assert world.n("node-b") != 0
    assert world.n("node-c") != 0


def test_ingress_rule_applies_at_the_destination_only(tmp_path: Path) -> None:
    cluster = three_nodes(
        endpoint("web", "node-a", "10.1.0.1"),
        endpoint("db", "node-b", "10.2.0.1"),
        rules=[rule("spiffe://example.org/web", "spiffe://example.org/db", "ingress")],
    )
    assert World(tmp_path, cluster, "node-a").policy() == {}
    assert World(tmp_path, cluster, "node-b").policy() == {("db", "web", IN): SPIRE}
    assert World(tmp_path, cluster, "node-c").policy() == {}


def test_egress_rule_applies_at_the_source_only(tmp_path: Path) -> None:
    cluster = three_nodes(
        endpoint("web", "node-a", "10.1.0.1"),
        endpoint("db", "node-b", "10.2.0.1"),
        rules=[rule("spiffe://example.org/web", "spiffe://example.org/db", "egress")],
    )
    assert World(tmp_path, cluster, "node-a").policy() == {("web", "db", OUT): SPIRE}
    assert World(tmp_path, cluster, "node-b").policy() == {}


def test_both_applies_on_each_side(tmp_path: Path) -> None:
    cluster = three_nodes(
        endpoint("web", "node-a", "10.1.0.1"),
        endpoint("db", "node-b", "10.2.0.1"),
        rules=[rule("spiffe://example.org/web", "spiffe://example.org/db", "both")],
    )
    assert World(tmp_path, cluster, "node-a").policy() == {("web", "db", OUT): SPIRE}
    assert World(tmp_path, cluster, "node-b").policy() == {("db", "web", IN): SPIRE}


def test_any_remote_is_one_wildcard_entry(tmp_path: Path) -> None:
    cluster = three_nodes(
        endpoint("db", "node-a", "10.1.0.1"),
        *(endpoint(f"client{i}", "node-b", f"10.2.0.{i}") for i in range(1, 50)),
        rules=[rule("*", "spiffe://example.org/db")],
    )
    world = World(tmp_path, cluster)
    assert world.policy() == {("db", "*", IN): SPIRE}
    keys = list(policy(cluster, LOCAL, world.handles))
    assert keys == [PolicyKey(world.h("db"), ANY, IN)]


def test_wildcard_covers_specific_entries_of_the_same_side(tmp_path: Path) -> None:
    cluster = three_nodes(
        endpoint("db", "node-a", "10.1.0.1"),
        endpoint("web", "node-b", "10.2.0.1"),
        rules=[
            rule("spiffe://example.org/web", "spiffe://example.org/db", "both"),
            rule("*", "spiffe://example.org/db", "ingress"),
            rule("spiffe://example.org/db", "spiffe://example.org/web", "egress"),
        ],
    )
    # The specific ingress entry is covered by the wildcard; the egress one is a different direction.
    assert World(tmp_path, cluster).policy() == {("db", "*", IN): SPIRE, ("db", "web", OUT): SPIRE}


def test_ktls_rules_compile_to_ktls_entries(tmp_path: Path) -> None:
    cluster = three_nodes(
        endpoint("db", "node-a", "10.1.0.1"),
        endpoint("web", "node-b", "10.2.0.1"),
        rules=[rule("spiffe://example.org/web", "spiffe://example.org/db", "both", "ktls")],
    )
    assert World(tmp_path, cluster).policy() == {("db", "web", IN): KTLS}
    assert World(tmp_path, cluster, "node-b").policy() == {("web", "db", OUT): KTLS}


def test_ktls_wins_where_rules_overlap(tmp_path: Path) -> None:
    cluster = three_nodes(
        endpoint("db", "node-a", "10.1.0.1"),
        endpoint("web", "node-b", "10.2.0.1"),
        endpoint("cache", "node-b", "10.2.0.2"),
        rules=[
            rule("spiffe://example.org/web", "spiffe://example.org/db", encrypt="ktls"),
            rule("spiffe://example.org/*", "spiffe://example.org/db"),
        ],
    )
    # The same key from a plain and a kTLS rule is kTLS, whichever comes first.
    expected = {("db", "web", IN): KTLS, ("db", "cache", IN): SPIRE, ("db", "db", IN): SPIRE}
    assert World(tmp_path, cluster).policy() == expected
    swapped = state(list(cluster.nodes.values()), cluster.endpoints, reversed(cluster.rules))
    assert World(tmp_path, swapped).policy() == expected


def test_a_wildcard_entry_never_weakens_a_ktls_pair(tmp_path: Path) -> None:
    cluster = three_nodes(
        endpoint("db", "node-a", "10.1.0.1"),
        endpoint("web", "node-b", "10.2.0.1"),
        rules=[
            rule("*", "spiffe://example.org/db"),
            rule("spiffe://example.org/web", "spiffe://example.org/db", encrypt="ktls"),
        ],
    )
    # The datapath looks up (db, web) before (db, *): the kTLS entry must stay next to the wildcard.
    assert World(tmp_path, cluster).policy() == {("db", "*", IN): SPIRE, ("db", "web", IN): KTLS}


def test_narrow_patterns_expand_to_known_identities(tmp_path: Path) -> None:
    cluster = three_nodes(
        endpoint("shop/db", "node-a", "10.1.0.1"),
        endpoint("shop/web", "node-b", "10.2.0.1"),
        endpoint("shop/cart", "node-c", "10.3.0.1"),
        endpoint("billing/api", "node-b", "10.2.0.2"),
        endpoint("shop", "node-c", "10.3.0.2"),  # the parent itself is not "under" it
        rules=[rule("spiffe://example.org/shop/*", "spiffe://example.org/shop/db")],
    )
    assert World(tmp_path, cluster).policy() == {
        ("shop/db", "shop/db", IN): SPIRE,  # traffic between replicas of one identity
        ("shop/db", "shop/web", IN): SPIRE,
        ("shop/db", "shop/cart", IN): SPIRE,
    }


def test_trust_domain_pattern_and_foreign_identities(tmp_path: Path) -> None:
    foreign = endpoint("web", "node-b", "10.2.0.9")
    foreign = type(foreign)(sid("web", "other.org"), foreign.node, foreign.prefixes, foreign.selectors)
    cluster = three_nodes(
        endpoint("db", "node-a", "10.1.0.1"),
        endpoint("web", "node-b", "10.2.0.1"),
        foreign,
        rules=[rule("spiffe://example.org/*", "spiffe://example.org/db")],
    )
    world = World(tmp_path, cluster)
    keys = policy(cluster, LOCAL, world.handles)
    remote_ids = {world.handles.identity_name(k.remote) for k in keys}
    assert remote_ids == {"spiffe://example.org/db", "spiffe://example.org/web"}


def test_local_side_patterns_select_local_identities(tmp_path: Path) -> None:
    cluster = three_nodes(
        endpoint("shop/db", "node-a", "10.1.0.1"),
        endpoint("shop/cache", "node-a", "10.1.0.2"),
        endpoint("other", "node-a", "10.1.0.3"),
        endpoint("shop/web", "node-b", "10.2.0.1"),
        rules=[rule("spiffe://example.org/shop/web", "spiffe://example.org/shop/*")],
    )
    assert World(tmp_path, cluster).policy() == {
        ("shop/db", "shop/web", IN): SPIRE,
        ("shop/cache", "shop/web", IN): SPIRE,
    }


def test_any_on_both_sides(tmp_path: Path) -> None:
    cluster = three_nodes(
        endpoint("a", "node-a", "10.1.0.1"),
        endpoint("b", "node-a", "10.1.0.2"),
        endpoint("c", "node-b", "10.2.0.1"),
        rules=[rule("*", "*", "both")],
    )
    assert World(tmp_path, cluster).policy() == {
        ("a", "*", IN): SPIRE,
        ("a", "*", OUT): SPIRE,
        ("b", "*", IN): SPIRE,
        ("b", "*", OUT): SPIRE,
    }


def test_pattern_matching_no_one_yields_nothing(tmp_path: Path) -> None:
    cluster = three_nodes(
        endpoint("db", "node-a", "10.1.0.1"),
        rules=[rule("spiffe://example.org/not-deployed-yet", "spiffe://example.org/db")],
    )
    world = World(tmp_path, cluster)
    assert world.policy() == {}
    assert world.pairs() == set()


def test_node_absent_from_state_has_no_policy_and_no_pairs(tmp_path: Path) -> None:
    cluster = three_nodes(endpoint("db", "node-b", "10.2.0.1"), rules=[rule("*", "*", "both")])
    world = World(tmp_path, cluster, "node-z")
    assert world.policy() == {}
    assert world.pairs() == set()
    assert ipcache(cluster, "node-z", world.handles)[ipaddress.ip_network("10.2.0.1/32")].node == world.n(
        "node-b"
    )


def test_pairs_cover_every_node_hosting_a_remote_identity(tmp_path: Path) -> None:
    cluster = three_nodes(
        endpoint("db", "node-a", "10.1.0.1"),
        endpoint("web", "node-b", "10.2.0.1"),
        endpoint("web", "node-c", "10.3.0.1"),
        endpoint("web", "node-a", "10.1.0.2"),
        rules=[rule("spiffe://example.org/web", "spiffe://example.org/db")],
    )
    world = World(tmp_path, cluster)
    assert world.pairs() == {
        ("db", "web", "node-a", True),  # local: both SVIDs held here, no handshake
        ("db", "web", "node-b", False),
        ("db", "web", "node-c", False),
    }
    pairs = auth_pairs(cluster, LOCAL, world.handles)
    by_node = {p.node: p for p in pairs}
    assert by_node["node-a"].node_handle == 0
    assert by_node["node-b"].node_handle == world.n("node-b")
    assert {(p.local_handle, p.remote_handle) for p in pairs} == {(world.h("db"), world.h("web"))}
    assert attestations(pairs) == {(sid("web"), "node-b"), (sid("web"), "node-c")}


def test_any_expands_to_every_known_identity_for_pairs(tmp_path: Path) -> None:
    cluster = three_nodes(
        endpoint("db", "node-a", "10.1.0.1"),
        endpoint("web", "node-b", "10.2.0.1"),
        endpoint("job", "node-c", "10.3.0.1"),
        rules=[rule("*", "spiffe://example.org/db")],
    )
    assert World(tmp_path, cluster).pairs() == {
        ("db", "db", "node-a", True),
        ("db", "web", "node-b", False),
        ("db", "job", "node-c", False),
    }


def test_ingress_and_egress_pairs_merge(tmp_path: Path) -> None:
    cluster = three_nodes(
        endpoint("web", "node-a", "10.1.0.1"),
        endpoint("db", "node-b", "10.2.0.1"),
        rules=[
            rule("spiffe://example.org/web", "spiffe://example.org/db", "egress"),
            rule("spiffe://example.org/db", "spiffe://example.org/web", "ingress"),
        ],
    )
    world = World(tmp_path, cluster)
    assert world.policy() == {("web", "db", OUT): SPIRE, ("web", "db", IN): SPIRE}
    assert world.pairs() == {("web", "db", "node-b", False)}  # the auth map key has no direction


def test_handshakes_grow_with_remote_identities_not_pairs(tmp_path: Path) -> None:
    local = [endpoint(f"l{i}", "node-a", f"10.1.0.{i}") for i in range(1, 21)]
    remote = [endpoint(f"r{i}", "node-b", f"10.2.0.{i}") for i in range(1, 21)]
    cluster = state(
        [node("node-a"), node("node-b")],
        [*local, *remote],
        [rule("spiffe://example.org/*", "spiffe://example.org/*", "ingress")],
    )
    world = World(tmp_path, cluster)
    pairs = auth_pairs(cluster, LOCAL, world.handles)
    assert len([p for p in pairs if not p.on_local_node]) == 20 * 20
    assert len(attestations(pairs)) == 20


def test_desired_state_bundles_all_three(tmp_path: Path) -> None:
    cluster = three_nodes(
        endpoint("db", "node-a", "10.1.0.1"),
        endpoint("web", "node-b", "10.2.0.1"),
        rules=[rule("*", "spiffe://example.org/db")],
    )
    world = World(tmp_path, cluster)
    desired = desired_state(cluster, LOCAL, world.handles)
    assert desired.version == cluster.version
    assert len(desired.ipcache) == 2
    assert list(desired.policy) == [PolicyKey(world.h("db"), ANY, IN)]
    assert {p.remote for p in desired.pairs} == {sid("db"), sid("web")}
    assert all(isinstance(p, AuthPair) for p in desired.pairs)


def test_missing_handle_is_a_clear_error(tmp_path: Path) -> None:
    cluster = three_nodes(endpoint("db", "node-b", "10.2.0.1"), rules=[])
    registry = HandleRegistry.open(tmp_path / "handles.json", LOCAL)
    with pytest.raises(ClusterStateError, match='no handle assigned to node "node-b"'):
        ipcache(cluster, LOCAL, registry)
    registry.assign([], cluster.nodes)
    with pytest.raises(ClusterStateError, match=re.escape("no handle assigned to spiffe://example.org/db")):
        ipcache(cluster, LOCAL, registry)
