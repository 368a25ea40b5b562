from __future__ import annotations

import ipaddress

import pytest

from authd.encryption.device import PeerSpec
from authd.encryption.keys import KeyPair, PublicKey
from authd.encryption.uapi import parse_get, set_request
from authd.errors import EncryptionError

PEER = PublicKey(bytes(range(32)))
PSK = bytes(range(32, 64))


def test_set_request_is_the_exact_text_protocol() -> None:
    pair = KeyPair.from_raw(b"\x08" * 32)
    spec = PeerSpec(
        PEER,
        PSK,
        (ipaddress.ip_address("fd00::2"), 51820),
        (ipaddress.ip_network("10.1.0.0/24"), ipaddress.ip_network("10.1.1.5/32")),
    )
    gone = PublicKey(b"\xff" * 32)
    assert set_request(private_key=pair, listen_port=51820, peers=[spec], remove=[gone]).decode() == (
        "set=1\n"
        f"private_key={'08' * 32}\n"
        "listen_port=51820\n"
        f"public_key={PEER.hex()}\n"
        f"preshared_key={PSK.hex()}\n"
        "endpoint=[fd00::2]:51820\n"
        "persistent_keepalive_interval=0\n"
        "replace_allowed_ips=true\n"
        "allowed_ip=10.1.0.0/24\n"
        "allowed_ip=10.1.1.5/32\n"
        f"public_key={'ff' * 32}\n"
        "remove=true\n"
        "\n"
    )


def test_get_reply_is_parsed() -> None:
    pair = KeyPair.generate()
    reply = (
        f"private_key={pair.private_raw().hex()}\nlisten_port=51820\n"
        f"public_key={PEER.hex()}\npreshared_key={PSK.hex()}\nprotocol_version=1\n"
        "endpoint=192.0.2.2:51820\nlast_handshake_time_sec=1700000000\nlast_handshake_time_nsec=500000000\n"
        "tx_bytes=10\nrx_bytes=20\npersistent_keepalive_interval=0\n"
        "allowed_ip=10.1.0.0/24\nallowed_ip=10.1.1.0/24\n"
        f"public_key={'ff' * 32}\npreshared_key={'0' * 64}\nlast_handshake_time_sec=0\n"
        "last_handshake_time_nsec=0\nerrno=0\n\n"
    )
    status = parse_get(reply)
    assert status.public_key == pair.public
    assert status.listen_port == 51820
    first = status.peer(PEER)
    assert first is not None
    assert first.endpoint == "192.0.2.2:51820"
    assert first.last_handshake == 1700000000.5
    assert (first.rx_bytes, first.tx_bytes, first.has_preshared_key) == (20, 10, True)
    assert [str(p) for p in first.allowed_ips] == ["10.1.0.0/24", "10.1.1.0/24"]
    second = status.peer(PublicKey(b"\xff" * 32))
    assert second is not None
    assert (second.last_handshake, second.endpoint, second.has_preshared_key) == (None, None, False)


@pytest.mark.parametrize(
    "reply",
    ["errno=22\n\n", "listen_port=1\n\n", "garbage\nerrno=0\n\n", "public_key=zz\nerrno=0\n\n"],
)
def test_bad_get_reply_is_an_error(reply: str) -> None:
    with pytest.raises(EncryptionError):
        parse_get(reply)
