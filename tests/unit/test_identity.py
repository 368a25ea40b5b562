"""SPIFFE ID, trust domain and selector parsing, after go-spiffe's spiffeid test tables; SNI names."""

from __future__ import annotations

import random
import re
import string

import pytest

from authd.errors import SpiffeIdError
from authd.identity import (
    MAX_ID_BYTES,
    MAX_TRUST_DOMAIN_BYTES,
    Selector,
    SpiffeId,
    TrustDomain,
    node_id,
    sni_for,
    validate_path,
)

TD_CHARS = frozenset(string.ascii_lowercase + string.digits + ".-_")
PATH_CHARS = frozenset(string.ascii_letters + string.digits + ".-_")

BAD_TD_CHAR = (
    "trust domain characters are limited to lowercase letters, numbers, dots, dashes, and underscores"
)
BAD_PATH_CHAR = "path segment characters are limited to letters, numbers, dots, dashes, and underscores"
WRONG_SCHEME = "scheme is missing or invalid"
TD_MISSING = "trust domain is missing"
TRAILING_SLASH = "path cannot have a trailing slash"
EMPTY_SEGMENT = "path cannot contain empty segments"
DOT_SEGMENT = "path cannot contain dot segments"
NO_LEADING_SLASH = "path must have a leading slash"

ALL_CHARS = [chr(code) for code in range(256) if chr(code) != "/"]


def _refused(text: str, message: str) -> None:
    with pytest.raises(SpiffeIdError, match=re.escape(message)) as caught:
        SpiffeId.parse(text)
    assert str(caught.value).startswith("spiffeid: ")


@pytest.mark.parametrize("char", ALL_CHARS, ids=lambda c: f"0x{ord(c):02x}")
def test_every_byte_in_the_trust_domain(char: str) -> None:
    text = f"spiffe://trust{char}domain/path"
    if char in TD_CHARS:
        assert SpiffeId.parse(text).trust_domain == TrustDomain(f"trust{char}domain")
        assert TrustDomain.parse(f"trust{char}domain").name == f"trust{char}domain"
    else:
        _refused(text, BAD_TD_CHAR)
        with pytest.raises(SpiffeIdError, match=re.escape(BAD_TD_CHAR)):
            TrustDomain.parse(f"trust{char}domain")


@pytest.mark.parametrize("char", ALL_CHARS, ids=lambda c: f"0x{ord(c):02x}")
def test_every_byte_in_the_path(char: str) -> None:
    text = f"spiffe://trustdomain/path{char}"
    if char in PATH_CHARS:
        assert SpiffeId.parse(text).path == f"/path{char}"
    else:
        _refused(text, BAD_PATH_CHAR)
        with pytest.raises(SpiffeIdError, match=re.escape(BAD_PATH_CHAR)):
            validate_path(f"/path{char}")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "cannot be empty"),
        ("s", WRONG_SCHEME),
        ("spiffe", WRONG_SCHEME),
        ("spiffe:", WRONG_SCHEME),
        ("spiffe:/", WRONG_SCHEME),
        ("spiffe:/trustdomain/path", WRONG_SCHEME),
        ("spiffe//trustdomain/path", WRONG_SCHEME),
        ("Spiffe://trustdomain/path", WRONG_SCHEME),
        ("SPIFFE://trustdomain/path", WRONG_SCHEME),
        ("https://trustdomain/path", WRONG_SCHEME),
        (" spiffe://trustdomain/path", WRONG_SCHEME),
        ("spiffe://", TD_MISSING),
        ("spiffe:///", TD_MISSING),
        ("spiffe:///path", TD_MISSING),
    ],
)
def test_scheme_and_missing_trust_domain(text: str, message: str) -> None:
    _refused(text, message)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("spiffe://Trustdomain/path", BAD_TD_CHAR),
        ("spiffe://TRUSTDOMAIN/path", BAD_TD_CHAR),
        ("spiffe://trustdomain\n/path", BAD_TD_CHAR),
        ("spiffe://trustdomain\n", BAD_TD_CHAR),
        ("spiffe://trustdomain/path\n", BAD_PATH_CHAR),
        ("spiffe://trustdomain/path\r\n", BAD_PATH_CHAR),
        ("spiffe://user@trustdomain/path", BAD_TD_CHAR),
        ("spiffe://trustdomain:8443/path", BAD_TD_CHAR),
        ("spiffe://[::1]/path", BAD_TD_CHAR),
        ("spiffe://trustdomain?query", BAD_TD_CHAR),
        ("spiffe://trustdomain#fragment", BAD_TD_CHAR),
        ("spiffe://trustdomain/path?query", BAD_PATH_CHAR),
        ("spiffe://trustdomain/path#fragment", BAD_PATH_CHAR),
        ("spiffe://%F0%9F%A4%AF/path", BAD_TD_CHAR),
        ("spiffe://%62%61%64/path", BAD_TD_CHAR),
        ("spiffe://trustdomain/%F0%9F%A4%AF", BAD_PATH_CHAR),
        ("spiffe://trustdomain/%62%61%64", BAD_PATH_CHAR),
        ("spiffe://trustdomain/p%61th", BAD_PATH_CHAR),
        ("spiffe://trustdomain/wörkload", BAD_PATH_CHAR),
        ("spiffe://trustdomain/", TRAILING_SLASH),
        ("spiffe://trustdomain/path/", TRAILING_SLASH),
        ("spiffe://trustdomain/path/other/", TRAILING_SLASH),
        ("spiffe://trustdomain//", EMPTY_SEGMENT),
        ("spiffe://trustdomain//path", EMPTY_SEGMENT),
        ("spiffe://trustdomain/path//other", EMPTY_SEGMENT),
        ("spiffe://trustdomain/.", DOT_SEGMENT),
        ("spiffe://trustdomain/./path", DOT_SEGMENT),
        ("spiffe://trustdomain/path/./other", DOT_SEGMENT),
        ("spiffe://trustdomain/path/..", DOT_SEGMENT),
        ("spiffe://trustdomain/..", DOT_SEGMENT),
        ("spiffe://trustdomain/../path", DOT_SEGMENT),
        ("spiffe://trustdomain/path/../other", DOT_SEGMENT),
    ],
)
def test_refused_ids_name_the_rule(text: str, message: str) -> None:
    _refused(text, message)


@pytest.mark.parametrize(
    ("text", "trust_domain", "path"),
    [
        ("spiffe://trustdomain", "trustdomain", ""),
        ("spiffe://trustdomain/path", "trustdomain", "/path"),
        ("spiffe://trustdomain/path/other", "trustdomain", "/path/other"),
        ("spiffe://trustdomain/.path", "trustdomain", "/.path"),
        ("spiffe://trustdomain/..path", "trustdomain", "/..path"),
        ("spiffe://trustdomain/...", "trustdomain", "/..."),
        ("spiffe://trustdomain/path.", "trustdomain", "/path."),
        ("spiffe://trustdomain/Path/UPPER", "trustdomain", "/Path/UPPER"),
        ("spiffe://10.0.0.1/ns/default/sa/web", "10.0.0.1", "/ns/default/sa/web"),
        ("spiffe://a_b-c.d/x", "a_b-c.d", "/x"),
    ],
)
def test_accepted_ids_round_trip(text: str, trust_domain: str, path: str) -> None:
    parsed = SpiffeId.parse(text)
    assert parsed.trust_domain.name == trust_domain
    assert parsed.path == path
    assert str(parsed) == text
    assert SpiffeId.parse(str(parsed)) == parsed
    assert parsed.is_root == (path == "")


def _long_id(total_bytes: int, td_bytes: int = 11) -> str:
    prefix = f"spiffe://{'t' * td_bytes}/"
    return prefix + "p" * (total_bytes - len(prefix))


def test_an_id_of_2048_bytes_is_accepted_and_one_more_is_refused() -> None:
    assert len(str(SpiffeId.parse(_long_id(MAX_ID_BYTES)))) == 2048
    _refused(_long_id(MAX_ID_BYTES + 1), "longer than 2048 bytes")


def test_the_id_limit_counts_bytes_not_characters() -> None:
    # 1025 two-byte characters are 2050 bytes: refused by length before the character check.
    _refused("spiffe://td/" + "é" * 1025, "longer than 2048 bytes")


def test_a_trust_domain_of_255_bytes_is_accepted_and_one_more_is_refused() -> None:
    assert SpiffeId.parse(_long_id(300, td_bytes=MAX_TRUST_DOMAIN_BYTES)).trust_domain.name == "t" * 255
    assert TrustDomain.parse("t" * 255).name == "t" * 255
    _refused(_long_id(300, td_bytes=MAX_TRUST_DOMAIN_BYTES + 1), "trust domain longer than 255 bytes")
    with pytest.raises(SpiffeIdError, match="trust domain longer than 255 bytes"):
        TrustDomain.parse("t" * 256)


@pytest.mark.parametrize("text", ["spiffe://td/\ud800", "spiffe://t\udcffd/path", "\udcff" * 3000])
def test_unencodable_text_is_refused_not_crashed_on(text: str) -> None:
    # A lone surrogate cannot be UTF-8 encoded; the parser must still answer with SpiffeIdError.
    with pytest.raises(SpiffeIdError):
        SpiffeId.parse(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("example.org", "example.org"),
        ("spiffe://example.org", "example.org"),
        ("spiffe://example.org/some/workload", "example.org"),
        ("10.0.0.1", "10.0.0.1"),
    ],
)
def test_trust_domain_parses_a_name_or_an_id(text: str, expected: str) -> None:
    trust_domain = TrustDomain.parse(text)
    assert trust_domain == TrustDomain(expected)
    assert str(trust_domain) == expected
    assert trust_domain.id_string() == f"spiffe://{expected}"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", TD_MISSING),
        ("Example.org", BAD_TD_CHAR),
        ("example.org\n", BAD_TD_CHAR),
        ("example.org/path", BAD_TD_CHAR),
        ("spiffe:/example.org/path", WRONG_SCHEME),
        ("SPIFFE://example.org", WRONG_SCHEME),
        ("spiffe:///path", TD_MISSING),
        ("spiffe://Example.org", BAD_TD_CHAR),
        ("spiffe://example.org/", TRAILING_SLASH),
    ],
)
def test_trust_domain_refusals(text: str, message: str) -> None:
    with pytest.raises(SpiffeIdError, match=re.escape(message)):
        TrustDomain.parse(text)


@pytest.mark.parametrize(
    ("path", "message"),
    [("foo", NO_LEADING_SLASH), ("/", TRAILING_SLASH), ("//", EMPTY_SEGMENT), ("/$", BAD_PATH_CHAR)],
)
def test_validate_path_refusals(path: str, message: str) -> None:
    with pytest.raises(SpiffeIdError, match=re.escape(message)):
        validate_path(path)
    with pytest.raises(SpiffeIdError, match=re.escape(message)):
        SpiffeId.from_parts(TrustDomain("example.org"), path)


def test_from_parts_builds_what_parse_reads() -> None:
    built = SpiffeId.from_parts(TrustDomain("example.org"), "/ns/web")
    assert built == SpiffeId.parse("spiffe://example.org/ns/web")
    assert SpiffeId.from_parts(TrustDomain("example.org"), "").is_root


def test_from_parts_refuses_an_id_parse_would_refuse() -> None:
    # Otherwise from_parts could mint an ID that no peer (nor our own parser) accepts back.
    td = TrustDomain("example.org")
    longest_path = "/" + "p" * (MAX_ID_BYTES - len("spiffe://example.org/"))
    assert len(str(SpiffeId.from_parts(td, longest_path))) == MAX_ID_BYTES
    with pytest.raises(SpiffeIdError, match="longer than 2048 bytes"):
        SpiffeId.from_parts(td, longest_path + "p")


def test_membership() -> None:
    spiffe_id = SpiffeId.parse("spiffe://example.org/web")
    assert spiffe_id.member_of(TrustDomain("example.org"))
    assert not spiffe_id.member_of(TrustDomain("example.com"))
    assert hash(spiffe_id) == hash(SpiffeId.parse("spiffe://example.org/web"))


def test_node_id_convention() -> None:
    assert node_id(TrustDomain("example.org"), "node-1") == SpiffeId.parse(
        "spiffe://example.org/authd/node-1"
    )
    for bad in ("", "..", "node 1", "Ñode"):
        with pytest.raises(SpiffeIdError):
            node_id(TrustDomain("example.org"), bad)


@pytest.mark.parametrize(
    ("text", "kind", "value"),
    [
        ("unix:uid:1000", "unix", "uid:1000"),
        ("k8s:ns:default", "k8s", "ns:default"),
        ("docker:label:a:b", "docker", "label:a:b"),
        ("x:y", "x", "y"),
    ],
)
def test_selector_parse(text: str, kind: str, value: str) -> None:
    selector = Selector.parse(text)
    assert (selector.type, selector.value) == (kind, value)
    assert str(selector) == text


@pytest.mark.parametrize("text", ["", "unix", ":uid:0", "unix:", ":"])
def test_selector_refusals(text: str) -> None:
    with pytest.raises(SpiffeIdError, match="selector"):
        Selector.parse(text)


_DNS_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")


def _assert_dns_name(name: str) -> None:
    assert len(name) <= 253
    for label in name.split("."):
        assert _DNS_LABEL.fullmatch(label), label


def _random_id(rng: random.Random) -> SpiffeId:
    segments = [
        "".join(rng.choice(sorted(PATH_CHARS - {"."})) for _ in range(rng.randint(1, 40)))
        for _ in range(rng.randint(1, 6))
    ]
    return SpiffeId.parse(f"spiffe://td{rng.randint(0, 3)}.test/" + "/".join(segments))


def test_sni_is_a_valid_dns_name_even_for_the_longest_ids() -> None:
    longest = SpiffeId.parse(_long_id(MAX_ID_BYTES, td_bytes=MAX_TRUST_DOMAIN_BYTES))
    for spiffe_id in (longest, SpiffeId.parse("spiffe://example.org/a"), SpiffeId.parse("spiffe://x")):
        _assert_dns_name(sni_for(spiffe_id))


def test_sni_is_deterministic_and_distinct_per_id() -> None:
    rng = random.Random(3)
    ids = {_random_id(rng) for _ in range(2000)}
    # IDs differing only in case must not collide: DNS names compare case-insensitively.
    ids |= {SpiffeId.parse("spiffe://example.org/Web"), SpiffeId.parse("spiffe://example.org/web")}
    names = {sni_for(spiffe_id) for spiffe_id in ids}
    assert len(names) == len(ids)
    for spiffe_id in list(ids)[:50]:
        name = sni_for(spiffe_id)
        _assert_dns_name(name)
        assert name == sni_for(SpiffeId.parse(str(spiffe_id)))
        assert name == name.lower()
