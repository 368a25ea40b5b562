"""The config decoder's value types beyond scalars: IP addresses and prefixes, parsed text, required keys."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any

import pytest

from authd.config.schema import IpAddress, IpNetwork, decode, required, setting, toml_value
from authd.identity import Selector, SpiffeId


@dataclass(frozen=True, slots=True)
class Item:
    name: str = required("a name")
    tags: tuple[str, ...] = required("tags", check=lambda v: None if v else "must not be empty")
    note: str = setting("", "optional")


@dataclass(frozen=True, slots=True)
class Doc:
    address: IpAddress | None = setting(None, "an address")
    prefix: IpNetwork | None = setting(None, "a prefix")
    prefixes: tuple[IpNetwork, ...] = setting((), "prefixes")
    spiffe_id: SpiffeId | None = setting(None, "an ID")
    selectors: tuple[Selector, ...] = setting((), "selectors")
    item: tuple[Item, ...] = setting((), "items")


PREFIX_EXPECTED = 'expected an IP prefix like "10.1.0.0/24" or a bare address'


def decoded(text: str) -> tuple[Doc, list[str]]:
    problems: list[str] = []
    return decode(Doc, tomllib.loads(text), problems), problems


def problems_of(text: str) -> list[str]:
    return decoded(text)[1]


def test_ip_addresses_and_prefixes_decode() -> None:
    doc, problems = decoded(
        'address = "fd00::1"\nprefix = "10.1.0.0/24"\nprefixes = ["10.0.0.5", "fd00::/64", "2001:db8::7"]\n'
    )
    assert problems == []
    assert doc.address == IPv6Address("fd00::1")
    assert doc.prefix == IPv4Network("10.1.0.0/24")
    assert doc.prefixes == (
        IPv4Network("10.0.0.5/32"),
        IPv6Network("fd00::/64"),
        IPv6Network("2001:db8::7/128"),
    )


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (
            'address = "10.0.0.256"',
            'address: expected an IP address like "10.0.0.1" or "fd00::1", got "10.0.0.256"',
        ),
        (
            'address = "10.0.0.0/8"',
            'address: expected an IP address like "10.0.0.1" or "fd00::1", got "10.0.0.0/8"',
        ),
        (
            "address = 167772161",
            'address: expected an IP address like "10.0.0.1" or "fd00::1", got integer 167772161',
        ),
        (
            'prefix = "10.1.0.5/24"',
            (
                'prefix: expected an IP prefix like "10.1.0.0/24" or a bare address, got "10.1.0.5/24" '
                "(10.1.0.5/24 has host bits set)"
            ),
        ),
        (
            'prefixes = ["10.1.0.0/24", "web"]',
            "prefixes[1]: " + PREFIX_EXPECTED + ', got "web" (not an IP prefix)',
        ),
        (
            'prefix = "10.0.0.0/33"',
            "prefix: " + PREFIX_EXPECTED + ', got "10.0.0.0/33" (not an IP prefix)',
        ),
    ],
)
def test_ip_errors_name_key_value_and_expectation(text: str, problem: str) -> None:
    assert problems_of(text) == [problem]


def test_parsed_text_types_decode() -> None:
    doc, problems = decoded(
        'spiffe_id = "spiffe://example.org/web"\nselectors = ["unix:uid:1000", "k8s:ns:shop"]\n'
    )
    assert problems == []
    assert doc.spiffe_id == SpiffeId.parse("spiffe://example.org/web")
    assert doc.selectors == (Selector("unix", "uid:1000"), Selector("k8s", "ns:shop"))


def test_parsed_text_errors_name_key_value_and_reason() -> None:
    assert problems_of('spiffe_id = "spiffe://example.org/a/../b"') == [
        'spiffe_id: spiffeid: path cannot contain dot segments, got "spiffe://example.org/a/../b"'
    ]
    assert problems_of("spiffe_id = 3") == ["spiffe_id: expected a string, got integer 3"]
    # The selector parser quotes the value itself; it is not repeated.
    assert problems_of('selectors = ["unix"]') == [
        "selectors[0]: selector: want \"<type>:<value>\", got 'unix'"
    ]


def test_missing_required_keys_are_named_and_the_table_dropped() -> None:
    doc, problems = decoded(
        '[[item]]\nname = "a"\ntags = ["x"]\n[[item]]\nnote = "b"\n[[item]]\nname = "c"\ntags = []\n'
    )
    assert problems == [
        "item[1].name: missing required key",
        "item[1].tags: missing required key",
        "item[2].tags: must not be empty, got an array",
    ]
    assert [item.name for item in doc.item] == ["a"]


def test_a_bad_array_item_is_not_reported_again_by_the_array_check() -> None:
    assert problems_of('[[item]]\nname = "a"\ntags = [1]\n') == [
        "item[0].tags[0]: expected a string, got integer 1"
    ]


def test_top_level_class_with_required_keys_is_a_programming_error() -> None:
    with pytest.raises(TypeError, match="needs defaults for name, tags"):
        decode(Item, {}, [])


@pytest.mark.parametrize(
    ("value", "rendered"),
    [
        (IPv4Address("10.0.0.1"), '"10.0.0.1"'),
        (IPv6Network("fd00::/64"), '"fd00::/64"'),
        (SpiffeId.parse("spiffe://example.org/web"), '"spiffe://example.org/web"'),
        ((Selector("unix", "uid:1"),), '["unix:uid:1"]'),
    ],
)
def test_new_types_render_as_toml(value: Any, rendered: str) -> None:
    assert toml_value(value) == rendered
