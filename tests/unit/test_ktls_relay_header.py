"""The kTLS relay header: a fixed-size record of the carried connection's real endpoints, parsed strictly."""

from __future__ import annotations

import random
from ipaddress import ip_address

import pytest

from authd.errors import KtlsError
from authd.ktls.relay import HEADER_SIZE, RelayHeader


@pytest.mark.parametrize(
    ("source", "destination"),
    [(("10.0.1.5", 40000), ("10.0.2.7", 443)), (("fd00::1:5", 1), ("fe80::7", 65535))],
)
def test_a_header_round_trips(source: tuple[str, int], destination: tuple[str, int]) -> None:
    header = RelayHeader((ip_address(source[0]), source[1]), (ip_address(destination[0]), destination[1]))
    wire = header.encode()
    assert len(wire) == HEADER_SIZE
    assert RelayHeader.decode(wire) == header


def test_mixed_families_are_refused() -> None:
    header = RelayHeader((ip_address("10.0.0.1"), 1), (ip_address("fd00::1"), 2))
    with pytest.raises(KtlsError, match="mixes address families"):
        header.encode()


def good() -> bytearray:
    return bytearray(RelayHeader((ip_address("10.0.1.5"), 40000), (ip_address("10.0.2.7"), 443)).encode())


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda raw: raw[:-1], "of 40 bytes"),
        (lambda raw: raw + b"\0", "of 42 bytes"),
        (lambda raw: b"XKR\x01" + raw[4:], "not a relay header"),
        (lambda raw: raw[:3] + b"\x02" + raw[4:], "not a relay header"),  # another version
        (lambda raw: raw[:4] + b"\x05" + raw[5:], "address family 5"),
        (lambda raw: raw[:21] + b"\0\0" + raw[23:], "port 0"),
        (lambda raw: raw[:9] + b"\x01" + raw[10:], "bytes past an IPv4 address"),
    ],
)
def test_malformed_headers_are_refused(mutate: object, reason: str) -> None:
    assert callable(mutate)
    with pytest.raises(KtlsError, match=reason):
        RelayHeader.decode(bytes(mutate(good())))


def test_random_bytes_never_raise_anything_but_a_refusal() -> None:
    rng = random.Random(7)
    for _ in range(5000):
        data = bytearray(good())
        for _ in range(rng.randrange(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        try:
            RelayHeader.decode(bytes(data))
        except KtlsError:
            continue
