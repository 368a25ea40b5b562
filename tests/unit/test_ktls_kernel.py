from __future__ import annotations

import datetime as dt
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from authd.errors import KtlsError
from authd.identity import SpiffeId
from authd.ktls.kernel import crypto_info, install, tls_stat
from authd.ktls.keys import CipherSuite, traffic_keys
from authd.ktls.session import Session
from authd.ktls.support import probe

SECRET = {suite: bytes(range(suite.hash_length)) for suite in CipherSuite}


@pytest.mark.parametrize(
    ("suite", "size", "cipher"),
    [
        (CipherSuite.AES_128_GCM_SHA256, 40, 51),
        (CipherSuite.AES_256_GCM_SHA384, 56, 52),
        (CipherSuite.CHACHA20_POLY1305_SHA256, 56, 54),
    ],
)
def test_crypto_info_layouts(suite: CipherSuite, size: int, cipher: int) -> None:
    keys = traffic_keys(suite, SECRET[suite])
    info = crypto_info(keys, 0x0102)
    assert len(info) == size  # sizeof(struct tls12_crypto_info_*) in include/uapi/linux/tls.h
    assert struct.unpack_from("=HH", info) == (0x0304, cipher)
    assert info[-8:] == (0x0102).to_bytes(8, "big")  # rec_seq, the next record's number, big-endian
    key_at = 4 + (12 if suite is CipherSuite.CHACHA20_POLY1305_SHA256 else 8)
    assert info[key_at : key_at + suite.key_length] == keys.key
    if suite is CipherSuite.CHACHA20_POLY1305_SHA256:
        assert info[4:16] == keys.iv  # the whole IV, no salt
    else:
        # salt = the IV's first 4 bytes (after the key), iv = its last 8 (before the key).
        assert info[4:12] == keys.iv[4:]
        assert info[key_at + suite.key_length : key_at + suite.key_length + 4] == keys.iv[:4]


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname(), timeout=5)
        server, _ = listener.accept()
    server.settimeout(5)
    with client, server:
        yield client, server


@pytest.mark.skipif(probe().available, reason="this kernel has TLS: the guest tier tests install()")
def test_without_kernel_tls_install_fails_closed(pair: tuple[socket.socket, socket.socket]) -> None:
    client, server = pair
    keys = traffic_keys(CipherSuite.AES_128_GCM_SHA256, SECRET[CipherSuite.AES_128_GCM_SHA256])
    peer = SpiffeId.parse("spiffe://example.org/db")
    session = Session(CipherSuite.AES_128_GCM_SHA256, keys, keys, peer, dt.datetime.now(dt.UTC))
    with pytest.raises(KtlsError, match=f'cannot set TCP_ULP "tls" on the session with {peer}: ENOENT'):
        install(client, session)
    assert server.recv(1) == b""  # shut down: the socket carries nothing, in clear or otherwise
    with pytest.raises(BrokenPipeError):
        client.sendall(b"plaintext")


def test_tls_stat_reads_the_counters(tmp_path: Path) -> None:
    stat = tmp_path / "tls_stat"
    stat.write_text("TlsCurrTxSw                     \t1\nTlsRxSw                         \t4\n")
    assert tls_stat(stat) == {"TlsCurrTxSw": 1, "TlsRxSw": 4}
    assert tls_stat(tmp_path / "absent") == {}
