from __future__ import annotations

import dataclasses
import re
import textwrap
from pathlib import Path

import pytest

from authd.cluster.file import ClusterFile, EndpointTable, NodeTable, PolicyTable, load_cluster, parse_cluster
from authd.cluster.model import ClusterState, IdentityPattern
from authd.errors import ClusterStateError
from tests.fakes.cluster import sid

REPO = Path(__file__).resolve().parents[2]

NODES = """
trust_domain = "example.org"

[[node]]
name = "node-a"
addresses = ["192.0.2.1", "2001:db8::1"]

[[node]]
name = "node-b"
addresses = ["192.0.2.2"]
spiffe_id = "spiffe://example.org/custom/b"
attest_port = 9000
"""

WEB = """
[[endpoint]]
spiffe_id = "spiffe://example.org/web"
node = "node-a"
prefixes = ["10.1.0.1", "fd00:1::1"]
selectors = ["unix:uid:1000"]
"""

DB = """
[[endpoint]]
spiffe_id = "spiffe://example.org/db"
node = "node-b"
prefixes = ["10.2.0.0/28"]
selectors = ["unix:uid:1001"]
"""

RULE = """
[[policy]]
source = "spiffe://example.org/web"
destination = "spiffe://example.org/db"
"""

GOOD = NODES + WEB + DB + RULE


def problems_of(text: str) -> list[str]:
    with pytest.raises(ClusterStateError) as caught:
        parse_cluster(textwrap.dedent(text))
    return caught.value.problems


def test_good_file_parses_into_state() -> None:
    state = parse_cluster(GOOD)
    node_a, node_b = state.node("node-a"), state.node("node-b")
    assert node_a is not None
    assert node_b is not None
    assert node_a.spiffe_id == sid("authd/node-a")  # derived from trust_domain
    assert [str(a) for a in node_a.addresses] == ["192.0.2.1", "2001:db8::1"]
    assert node_a.attest_port is None
    assert node_b.spiffe_id == sid("custom/b")
    assert node_b.attest_port == 9000
    assert [str(p) for p in state.endpoint_for(sid("web"))[0].prefixes] == ["10.1.0.1/32", "fd00:1::1/128"]
    (rule,) = state.rules
    assert rule.source == IdentityPattern.parse("spiffe://example.org/web")
    assert rule.enforce == "ingress"  # the default


def test_empty_file_is_an_empty_state() -> None:
    state = parse_cluster("")
    assert not state.nodes
    assert not state.endpoints


def test_example_file_loads() -> None:
    state = load_cluster(REPO / "config" / "cluster.example.toml")
    assert set(state.nodes) == {"node-a", "node-b"}
    assert len(state.endpoints) == 2
    assert {r.enforce for r in state.rules} == {"both", "ingress"}


def test_example_file_documents_every_key() -> None:
    text = (REPO / "config" / "cluster.example.toml").read_text()
    lines = text.splitlines()
    for table in (ClusterFile, NodeTable, EndpointTable, PolicyTable):
        for field in dataclasses.fields(table):
            if field.type.startswith("tuple[") and field.name in {"node", "endpoint", "policy"}:
                assert f"[[{field.name}]]" in text
                continue
            index = next(i for i, line in enumerate(lines) if line.startswith(f"{field.name} = "))
            assert lines[index - 1].startswith("#"), f"{field.name} has no comment above it"


def test_invalid_toml_is_one_clear_problem() -> None:
    (problem,) = problems_of("[[node]\n")
    assert problem.startswith("<cluster>: not valid TOML")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            '[[node]]\nname = "node-a"\naddresses = ["192.0.2.1"]\n',
            (
                "node[0].spiffe_id: missing: set it, or set the top-level trust_domain to use "
                "spiffe://<trust_domain>/authd/<name>"
            ),
        ),
        ('trust_domain = "Example.org"\n', "trust_domain: spiffeid: trust domain characters are limited to"),
        ('[[node]]\nname = "Node_A"\naddresses = ["192.0.2.1"]\n', "node[0].name: must be 1-253 lowercase"),
        ('[[node]]\nname = "node-a"\n', "node[0].addresses: missing required key"),
        ('[[node]]\nname = "node-a"\naddresses = []\n', "node[0].addresses: must not be empty, got an array"),
        (
            'trust_domain = "td"\n[[node]]\nname = "a"\naddresses = ["192.0.2.300"]\n',
            "node[0].addresses[0]: expected an IP address",
        ),
        (
            'trust_domain = "td"\n[[node]]\nname = "a"\naddresses = ["192.0.2.1"]\nattest_port = 0\n',
            "node[0].attest_port: must be a port number from 1 to 65535, got integer 0",
        ),
        (
            'trust_domain = "td"\n[[node]]\nname = "a"\naddresses = ["192.0.2.1"]\nport = 1\n',
            "node[0].port: unknown key",
        ),
        ('[[nodes]]\nname = "a"\n', 'nodes: unknown key (did you mean "node"?)'),
        (
            (
                '[[endpoint]]\nspiffe_id = "spiffe://example.org"\nnode = "a"\nprefixes = ["10.0.0.1"]\n'
                'selectors = ["unix:uid:1"]\n'
            ),
            'endpoint[0].spiffe_id: must name a workload, not a bare trust domain, got "spiffe://example.org"',
        ),
        (
            (
                '[[endpoint]]\nspiffe_id = "spiffe://example.org/web"\nnode = "a"\n'
                'prefixes = ["10.0.0.1/8"]\nselectors = ["unix:uid:1"]\n'
            ),
            (
                'endpoint[0].prefixes[0]: expected an IP prefix like "10.1.0.0/24" or a bare address, got '
                '"10.0.0.1/8" (10.0.0.1/8 has host bits set)'
            ),
        ),
        (
            (
                '[[endpoint]]\nspiffe_id = "spiffe://example.org/web"\nnode = "a"\nprefixes = ["10.0.0.1"]\n'
                "selectors = []\n"
            ),
            "endpoint[0].selectors: must not be empty, got an array",
        ),
        (
            '[[endpoint]]\nspiffe_id = "spiffe://example.org/web"\nnode = "a"\nprefixes = ["10.0.0.1"]\n',
            "endpoint[0].selectors: missing required key",
        ),
        (
            '[[policy]]\nsource = "spiffe://example.org/a*"\ndestination = "*"\n',
            (
                "policy[0].source: pattern: '*' may only stand alone or be the whole last path segment, got "
                '"spiffe://example.org/a*"'
            ),
        ),
        ('[[policy]]\nsource = "*"\n', "policy[0].destination: missing required key"),
        (
            '[[policy]]\nsource = "*"\ndestination = "*"\nenforce = "inbound"\n',
            'policy[0].enforce: must be one of "ingress", "egress", "both", got "inbound"',
        ),
        (
            '[[policy]]\nsource = "*"\ndestination = "*"\nencrypt = "tls"\n',
            'policy[0].encrypt: must be one of "none", "ktls", got "tls"',
        ),
    ],
)
def test_decoding_problems_name_key_path(text: str, expected: str) -> None:
    problems = problems_of(text)
    assert len(problems) == 1, problems
    assert problems[0].startswith(expected)


def test_every_problem_is_listed_at_once() -> None:
    problems = problems_of(
        NODES
        + WEB.replace('"10.1.0.1"', '"10.1.0.1/8"')
        + RULE.replace("spiffe://example.org/db", "spiffe://example.org/db/*/x")
        + '[[policy]]\nsource = "*"\ndestination = "*"\nenforce = "never"\n'
    )
    assert [p.split(":")[0] for p in problems] == [
        "endpoint[0].prefixes[0]",
        "policy[0].destination",
        "policy[1].enforce",
    ]


def test_decoding_problems_suppress_cross_checks() -> None:
    # node[1] is dropped for its bad address; the endpoint on it must not add "unknown node".
    problems = problems_of(NODES.replace('"192.0.2.2"', '"nowhere"') + DB)
    assert problems == [
        'node[1].addresses[0]: expected an IP address like "10.0.0.1" or "fd00::1", got "nowhere"'
    ]


# ------------------------------------------------------------------------------------------ cross-checks


def with_nodes(extra: str) -> str:
    return NODES + textwrap.dedent(extra)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            with_nodes(
                '[[node]]\nname = "node-a"\naddresses = ["192.0.2.3"]\nspiffe_id = "spiffe://example.org/x"\n'
            ),
            ['node[2].name: duplicate node name "node-a" (also node[0])'],
        ),
        (
            with_nodes(
                '[[node]]\nname = "node-c"\naddresses = ["192.0.2.3"]\nspiffe_id = "spiffe://example.org/custom/b"\n'
            ),
            ['node[2].spiffe_id: "spiffe://example.org/custom/b" is already the ID of node[1]'],
        ),
        (
            with_nodes(
                '[[node]]\nname = "node-c"\naddresses = ["192.0.2.3"]\nspiffe_id = "spiffe://example.org"\n'
            ),
            ['node[2].spiffe_id: "spiffe://example.org" names a trust domain, not a node'],
        ),
        (
            with_nodes('[[node]]\nname = "node-c"\naddresses = ["192.0.2.3", "192.0.2.1"]\n'),
            ["node[2].addresses[1]: 192.0.2.1 is also an address of node[0]"],
        ),
        (
            with_nodes('[[node]]\nname = "node-c"\naddresses = ["192.0.2.3", "192.0.2.3"]\n'),
            ["node[2].addresses[1]: 192.0.2.3 is listed twice"],
        ),
        (
            with_nodes('[[node]]\nname = "node-c"\naddresses = ["0.0.0.0", "ff02::1"]\n'),
            [
                "node[2].addresses[0]: 0.0.0.0 is not a unicast address",
                "node[2].addresses[1]: ff02::1 is not a unicast address",
            ],
        ),
        (
            with_nodes(WEB.replace('node = "node-a"', 'node = "nod-a"')),
            ['endpoint[0].node: unknown node "nod-a" (did you mean "node-a"?)'],
        ),
        (
            with_nodes(WEB.replace('node = "node-a"', 'node = "db-host"')),
            ['endpoint[0].node: unknown node "db-host"'],
        ),
        (
            with_nodes(WEB.replace("spiffe://example.org/web", "spiffe://example.org/authd/node-a")),
            [
                (
                    'endpoint[0].spiffe_id: "spiffe://example.org/authd/node-a" is the node identity of '
                    "node[0]; a workload needs its own"
                )
            ],
        ),
        (
            with_nodes(WEB.replace('["unix:uid:1000"]', '["unix:uid:1000", "unix:uid:1000"]')),
            ['endpoint[0].selectors[1]: "unix:uid:1000" is listed twice'],
        ),
        (
            with_nodes(WEB + WEB.replace('"10.1.0.1", "fd00:1::1"', '"10.1.0.9"')),
            ["endpoint[1]: same spiffe_id, node and selectors as endpoint[0]"],
        ),
        (
            with_nodes(WEB + DB.replace('"10.2.0.0/28"', '"10.1.0.1"')),
            ["endpoint[1].prefixes[0]: 10.1.0.1/32 is also claimed by endpoint[0].prefixes[0] (10.1.0.1/32)"],
        ),
        (
            with_nodes(WEB + DB.replace('"10.2.0.0/28"', '"10.1.0.0/24"')),
            ["endpoint[1].prefixes[0]: 10.1.0.0/24 overlaps endpoint[0].prefixes[0] (10.1.0.1/32)"],
        ),
        (
            with_nodes(DB.replace('"10.2.0.0/28"', '"10.0.0.0/8"') + WEB),
            ["endpoint[1].prefixes[0]: 10.1.0.1/32 overlaps endpoint[0].prefixes[0] (10.0.0.0/8)"],
        ),
        (
            with_nodes(WEB.replace('"fd00:1::1"', '"fd00:1::/64", "fd00:1::1"')),
            ["endpoint[0].prefixes[2]: fd00:1::1/128 overlaps endpoint[0].prefixes[1] (fd00:1::/64)"],
        ),
        (
            with_nodes(DB.replace('"10.2.0.0/28"', '"192.0.2.0/24"')),
            [
                'endpoint[0].prefixes[0]: 192.0.2.0/24 contains address 192.0.2.1 of node[0] ("node-a")',
                'endpoint[0].prefixes[0]: 192.0.2.0/24 contains address 192.0.2.2 of node[1] ("node-b")',
            ],
        ),
        (
            with_nodes(DB.replace('"10.2.0.0/28"', '"::ffff:10.2.0.1"')),
            ["endpoint[0].prefixes[0]: ::ffff:a02:1/128 is IPv4-mapped; write the IPv4 form"],
        ),
        (
            with_nodes(DB.replace('"10.2.0.0/28"', '"2001:db8::1"')),
            ['endpoint[0].prefixes[0]: 2001:db8::1/128 contains address 2001:db8::1 of node[0] ("node-a")'],
        ),
    ],
)
def test_cross_checks(text: str, expected: list[str]) -> None:
    assert problems_of(text) == expected


def test_a_rule_can_ask_for_ktls() -> None:
    state = parse_cluster(GOOD + RULE.replace("[[policy]]", '[[policy]]\nencrypt = "ktls"'))
    assert [rule.encrypt for rule in state.rules] == ["none", "ktls"]
    assert state.version != parse_cluster(GOOD + RULE).version


@pytest.mark.parametrize(
    ("side", "rule"),
    [
        ("source", RULE.replace('source = "spiffe://example.org/web"', 'source = "*"')),
        ("destination", RULE.replace('destination = "spiffe://example.org/db"', 'destination = "*"')),
    ],
)
def test_ktls_needs_an_svid_at_both_ends(side: str, rule: str) -> None:
    problems = problems_of(GOOD + rule.replace("[[policy]]", '[[policy]]\nencrypt = "ktls"'))
    expected = (
        f'policy[1].encrypt: "ktls" needs an SVID at both ends, but {side} "*" includes addresses not in '
        "cluster state; name the workloads (spiffe://<trust domain>/* for all)"
    )
    assert problems == [expected]


def test_same_identity_on_two_nodes_or_with_other_selectors_is_fine() -> None:
    second = WEB.replace('"10.1.0.1", "fd00:1::1"', '"10.1.0.2"').replace(
        '"unix:uid:1000"', '"unix:uid:2000"'
    )
    other_node = WEB.replace('"10.1.0.1", "fd00:1::1"', '"10.2.0.99"').replace("node-a", "node-b")
    state = parse_cluster(NODES + WEB + second + other_node)
    assert len(state.endpoint_for(sid("web"))) == 3


def test_families_do_not_overlap_each_other() -> None:
    # ::a01:1 is numerically 10.1.0.1; different families never overlap.
    state = parse_cluster(NODES + WEB + DB.replace('"10.2.0.0/28"', '"::a01:1"'))
    assert len(state.endpoints) == 2


def test_problems_name_the_source() -> None:
    with pytest.raises(ClusterStateError, match=re.escape("cluster: 1 problem(s) in /etc/x.toml")):
        parse_cluster("nodes = 1\n", source="/etc/x.toml")


def test_load_cluster_names_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ClusterStateError, match="does not exist"):
        load_cluster(tmp_path / "absent.toml")


def test_load_cluster_refuses_non_utf8(tmp_path: Path) -> None:
    path = tmp_path / "cluster.toml"
    path.write_bytes(b'trust_domain = "\xff"\n')
    with pytest.raises(ClusterStateError, match="not UTF-8"):
        load_cluster(path)


def good_state() -> ClusterState:
    return parse_cluster(GOOD)


def test_good_state_helper_is_stable() -> None:
    assert good_state().version == good_state().version
