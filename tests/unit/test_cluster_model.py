from __future__ import annotations

import re

import pytest

from authd.cluster.model import ClusterState, IdentityPattern, PatternKind
from authd.errors import SpiffeIdError
from authd.identity import SpiffeId
from tests.fakes.cluster import endpoint, node, rule, sid, state


@pytest.mark.parametrize(
    ("pattern", "spiffe_id", "expected"),
    [
        ("spiffe://example.org/ns/a/sa/web", "spiffe://example.org/ns/a/sa/web", True),
        ("spiffe://example.org/ns/a/sa/web", "spiffe://example.org/ns/a/sa/web2", False),
        ("spiffe://example.org/ns/a/sa/web", "spiffe://other.org/ns/a/sa/web", False),
        ("spiffe://example.org/ns/a/*", "spiffe://example.org/ns/a/sa/web", True),
        ("spiffe://example.org/ns/a/*", "spiffe://example.org/ns/a/x", True),
        ("spiffe://example.org/ns/a/*", "spiffe://example.org/ns/a", False),  # strictly under
        ("spiffe://example.org/ns/a/*", "spiffe://example.org/ns/apple", False),  # segment boundary
        ("spiffe://example.org/ns/a/*", "spiffe://example.org/ns/apple/x", False),
        ("spiffe://example.org/ns/a/*", "spiffe://other.org/ns/a/x", False),
        ("spiffe://example.org/*", "spiffe://example.org/x", True),
        ("spiffe://example.org/*", "spiffe://example.org/a/b/c", True),
        ("spiffe://example.org/*", "spiffe://example.org", False),
        ("spiffe://example.org/*", "spiffe://example.org.evil/x", False),
        ("spiffe://example.org/*", "spiffe://other.org/x", False),
        ("*", "spiffe://other.org/x", True),
    ],
)
def test_pattern_matching(pattern: str, spiffe_id: str, expected: bool) -> None:  # noqa: FBT001
    assert IdentityPattern.parse(pattern).matches(SpiffeId.parse(spiffe_id)) is expected


def test_only_any_matches_the_world() -> None:
    assert IdentityPattern.parse("*").matches(None)
    assert not IdentityPattern.parse("spiffe://example.org/*").matches(None)
    assert not IdentityPattern.parse("spiffe://example.org/web").matches(None)


@pytest.mark.parametrize(
    "text", ["*", "spiffe://example.org/*", "spiffe://example.org/ns/a/*", "spiffe://example.org/ns/a"]
)
def test_pattern_round_trips(text: str) -> None:
    assert str(IdentityPattern.parse(text)) == text


def test_pattern_kinds() -> None:
    assert IdentityPattern.parse("*").kind is PatternKind.ANY
    under = IdentityPattern.parse("spiffe://example.org/*")
    assert under.kind is PatternKind.UNDER
    assert under.base == SpiffeId.parse("spiffe://example.org")
    assert IdentityPattern.parse("spiffe://example.org/a").kind is PatternKind.EXACT


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("spiffe://example.org/a*", "'*' may only stand alone or be the whole last path segment"),
        ("spiffe://example.org/*/b", "'*' may only stand alone or be the whole last path segment"),
        ("spiffe://*/b", "'*' may only stand alone"),
        ("spiffe://example.org/*/*", "'*' may only stand alone"),
        ("**", "'*' may only stand alone"),
        (
            "spiffe://example.org",
            "names a trust domain, not a workload (for all of it write spiffe://example.org/*)",
        ),
        ("spiffe://Example.org/*", "trust domain characters are limited"),
        ("spiffe://example.org/a/../*", "dot segments"),
        ("spiffe://example.org//*", "trailing slash"),
        ("/*", "'*' may only stand alone"),
        ("", "cannot be empty"),
    ],
)
def test_bad_patterns_say_why(text: str, message: str) -> None:
    with pytest.raises(SpiffeIdError, match=re.escape(message)):
        IdentityPattern.parse(text)


def test_rule_sides() -> None:
    assert rule("*", "*", "ingress").at_ingress
    assert not rule("*", "*", "ingress").at_egress
    assert rule("*", "*", "egress").at_egress
    assert not rule("*", "*", "egress").at_ingress
    assert rule("*", "*", "both").at_ingress
    assert rule("*", "*", "both").at_egress


def two_node_state() -> ClusterState:
    return state(
        [node("node-b"), node("node-a")],
        [
            endpoint("web", "node-a", "10.1.0.1"),
            endpoint("web", "node-b", "10.2.0.1"),
            endpoint("db", "node-b", "10.2.0.2"),
        ],
        [rule("spiffe://example.org/web", "spiffe://example.org/db")],
    )


def test_lookups() -> None:
    cluster = two_node_state()
    assert list(cluster.nodes) == ["node-a", "node-b"]
    node_a = cluster.node("node-a")
    assert node_a is not None
    assert cluster.node("node-c") is None
    assert cluster.node_by_id(sid("authd/node-a")) is node_a
    assert cluster.node_by_id(sid("web")) is None
    assert [e.spiffe_id for e in cluster.endpoints_on("node-b")] == [sid("web"), sid("db")]
    assert cluster.endpoints_on("node-c") == ()
    assert {e.node for e in cluster.endpoint_for(sid("web"))} == {"node-a", "node-b"}
    assert cluster.endpoint_for(sid("nope")) == ()
    assert cluster.identities == {sid("web"), sid("db")}
    assert [n.name for n in cluster.where(sid("web"))] == ["node-a", "node-b"]
    assert [n.name for n in cluster.where(sid("db"))] == ["node-b"]
    assert cluster.where(sid("nope")) == ()


def test_matching_lists_known_identities_only() -> None:
    cluster = two_node_state()
    assert cluster.matching(IdentityPattern.parse("*")) == {sid("web"), sid("db")}
    assert cluster.matching(IdentityPattern.parse("spiffe://example.org/*")) == {sid("web"), sid("db")}
    assert cluster.matching(IdentityPattern.parse("spiffe://example.org/db")) == {sid("db")}
    assert cluster.matching(IdentityPattern.parse("spiffe://example.org/unknown")) == frozenset()
    assert cluster.matching(IdentityPattern.parse("spiffe://other.org/*")) == frozenset()


def test_version_is_a_content_digest_independent_of_order() -> None:
    first = two_node_state()
    shuffled = ClusterState(
        reversed(list(first.nodes.values())), reversed(first.endpoints), reversed(first.rules)
    )
    assert shuffled.version == first.version
    assert shuffled == first
    assert len(first.version) == 64


def test_version_changes_with_content() -> None:
    base = two_node_state()
    nodes = list(base.nodes.values())
    variants = [
        ClusterState(nodes, base.endpoints, [*base.rules, rule("*", "spiffe://example.org/web")]),
        ClusterState(
            nodes, base.endpoints, [rule("spiffe://example.org/web", "spiffe://example.org/db", "both")]
        ),
        ClusterState(nodes, base.endpoints[:2], base.rules),
        ClusterState(
            [nodes[0], node("node-b", "192.0.2.99")], base.endpoints, base.rules
        ),  # an address changed
        ClusterState(nodes, [*base.endpoints[:2], endpoint("db", "node-b", "10.2.0.3")], base.rules),
    ]
    versions = {v.version for v in variants}
    assert base.version not in versions
    assert len(versions) == len(variants)


def test_address_preference_order_is_content() -> None:
    first = ClusterState([node("node-a", "192.0.2.1", "2001:db8::1")], [], [])
    second = ClusterState([node("node-a", "2001:db8::1", "192.0.2.1")], [], [])
    assert first.version != second.version


def test_snapshot_is_read_only() -> None:
    cluster = two_node_state()
    with pytest.raises(AttributeError):
        cluster.version = "x"  # type: ignore[misc]
    with pytest.raises(TypeError):
        cluster.nodes["node-z"] = node("node-z")  # type: ignore[index]
    with pytest.raises(AttributeError):
        cluster.extra = 1  # type: ignore[attr-defined]
