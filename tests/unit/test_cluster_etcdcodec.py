"""The etcd encoding of cluster state: round trips, refusals that name the key, other versions ignored."""

from __future__ import annotations

from pathlib import Path

import pytest

from authd.cluster.etcdcodec import decode_state, encode_state, render_toml
from authd.cluster.file import load_cluster, parse_cluster
from authd.errors import ClusterStateError

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = load_cluster(REPO / "config" / "cluster.example.toml")


def problems(items: dict[str, bytes]) -> list[str]:
    with pytest.raises(ClusterStateError) as caught:
        decode_state(items, origin="etcd /p/")
    return caught.value.problems


def test_encoding_round_trips() -> None:
    items = encode_state(EXAMPLE)
    assert sorted(k.split("/")[1] for k in items) == ["endpoint"] * 2 + ["node"] * 2 + ["policy"] * 2
    assert decode_state(items, origin="etcd").version == EXAMPLE.version
    text = render_toml(EXAMPLE)
    assert parse_cluster(text).version == EXAMPLE.version
    assert render_toml(parse_cluster(text)) == text


def test_a_ktls_rule_round_trips() -> None:
    text = (
        (REPO / "config" / "cluster.example.toml").read_text().replace('encrypt = "none"', 'encrypt = "ktls"')
    )
    state = parse_cluster(text)
    assert [rule.encrypt for rule in state.rules] == ["ktls", "none"]
    assert state.version != EXAMPLE.version
    assert decode_state(encode_state(state), origin="etcd").version == state.version
    assert parse_cluster(render_toml(state)).version == state.version
    assert 'encrypt = "ktls"' in render_toml(state)
    assert "encrypt" not in render_toml(EXAMPLE)  # the default is left out, as before


def test_keys_of_other_versions_are_ignored() -> None:
    items = {**encode_state(EXAMPLE), "v2/anything": b"\x00not json"}
    assert decode_state(items, origin="etcd").version == EXAMPLE.version


def test_problems_name_the_key() -> None:
    items = encode_state(EXAMPLE)
    key = next(k for k in items if k.startswith("v1/node/node-b"))
    items[key] = items[key].replace(b'"192.0.2.11"', b'"192.0.2.10"')
    (problem,) = problems(items)
    assert problem == "v1/node/node-b addresses[0]: 192.0.2.10 is also an address of v1/node/node-a"


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("v1/node/node-c", b'{"name": "node-d", "addresses": ["192.0.2.9"]}', "the key names node 'node-c'"),
        ("v1/endpoint/x", b"not json", "v1/endpoint/x: not a UTF-8 JSON object"),
        ("v1/endpoint/x", b"[]", "v1/endpoint/x: not a JSON object"),
        ("v1/widget/x", b"{}", "v1/widget/x: unknown kind 'widget'"),
    ],
)
def test_malformed_keys_are_refused(key: str, value: bytes, expected: str) -> None:
    (problem,) = problems({**encode_state(EXAMPLE), key: value})
    assert expected in problem


def test_two_rules_for_one_pair_cannot_be_stored() -> None:
    doubled = parse_cluster(
        (REPO / "config" / "cluster.example.toml").read_text()
        + '[[policy]]\nsource = "*"\ndestination = "spiffe://example.org/ns/shop/sa/web"\n'
        + 'enforce = "egress"\n'
    )
    with pytest.raises(ClusterStateError, match="two policy rules from"):
        encode_state(doubled)
