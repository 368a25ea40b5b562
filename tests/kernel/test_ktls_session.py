"""A kTLS session end to end in the guest's kernel: handshake in user space, then TX and RX in kernel TLS.

Two sockets on loopback, joined through a relay that keeps every byte it forwards (the wire). Each end
runs :func:`authd.ktls.session.handshake` with its workload's SVID and hands both directions to the
kernel with :func:`authd.ktls.kernel.install`. Then a marker goes each way through plain ``send`` and
``recv``: it arrives, it is nowhere on the wire, the wire is a sequence of TLS records ending in the
application-data records the kernel made, and ``/proc/net/tls_stat`` counts the sessions, TX and RX.
"""

from __future__ import annotations

import datetime as dt
import os
import socket
import threading
from collections.abc import Iterator

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from authd.identity import SpiffeId
from authd.ktls.kernel import install, tls_stat
from authd.ktls.keys import CipherSuite, traffic_keys
from authd.ktls.session import Session, handshake
from authd.ktls.support import probe
from authd.x509svid import BundleSet
from tests.fakes.ca import LeafOptions
from tests.fakes.ca import TestCA as FakeCA
from tests.kernel.wire import WireTap, records

NOW = dt.datetime.now(dt.UTC)
WEB = SpiffeId.parse("spiffe://example.org/ns/shop/sa/web")
DB = SpiffeId.parse("spiffe://example.org/ns/shop/sa/db")
REQUEST = b"authd-ktls-marker: request from web, encrypted by the kernel"
REPLY = b"authd-ktls-marker: reply from db, decrypted by the kernel"
TAG = 16  # every TLS 1.3 AEAD suite's tag
APPLICATION_DATA = 23


@pytest.fixture
def ends() -> Iterator[tuple[socket.socket, socket.socket, WireTap]]:
    """(client, server, relay): the client is connected to the server through the relay."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        relay = WireTap(listener.getsockname()[:2])
        try:
            client = socket.create_connection(relay.listener.getsockname()[:2], timeout=10)
            server, _ = listener.accept()
            server.settimeout(10)
            with client, server:
                yield client, server, relay
        finally:
            relay.close()


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        assert chunk, f"closed after {len(data)} of {size} bytes"
        data += chunk
    return data


def test_a_session_runs_in_kernel_tls_both_ways(ends: tuple[socket.socket, socket.socket, WireTap]) -> None:
    client, server, relay = ends
    ca = FakeCA.create("example.org", not_before=NOW - dt.timedelta(days=1))
    bundles = BundleSet.of([ca.bundle()])
    validity = LeafOptions(not_before=NOW - dt.timedelta(hours=1), not_after=NOW + dt.timedelta(hours=1))
    before = tls_stat()
    served: list[Session] = []
    failed: list[BaseException] = []

    def serve() -> None:
        try:
            session = handshake(server, ca.mint(str(DB), validity), bundles, WEB, server=True, at=NOW)
            install(server, session)
            served.append(session)
            assert recv_exactly(server, len(REQUEST)) == REQUEST
            server.sendall(REPLY)
        except BaseException as err:  # noqa: BLE001 - handed to the test thread
            failed.append(err)

    thread = threading.Thread(target=serve)
    thread.start()
    session = handshake(client, ca.mint(str(WEB), validity), bundles, DB, server=False, at=NOW)
    install(client, session)
    client.sendall(REQUEST)
    assert recv_exactly(client, len(REPLY)) == REPLY
    thread.join(30)
    assert not failed, failed
    assert served[0].peer == WEB
    assert session.peer == DB

    # Both sockets (still open) are in kernel TLS, TX and RX, with nothing refused.
    after = tls_stat()
    assert after["TlsCurrTxSw"] - before["TlsCurrTxSw"] == 2, (before, after)
    assert after["TlsCurrRxSw"] - before["TlsCurrRxSw"] == 2, (before, after)
    assert after["TlsTxSw"] - before["TlsTxSw"] == 2
    assert after["TlsRxSw"] - before["TlsRxSw"] == 2
    assert after["TlsDecryptError"] == before["TlsDecryptError"]

    # On the wire: TLS records only, the markers in neither direction, each ending in the kernel's record.
    to_server, to_client = bytes(relay.wire["to-server"]), bytes(relay.wire["to-client"])
    assert REQUEST not in to_server
    assert REPLY not in to_client
    assert records(to_server)[-1] == (APPLICATION_DATA, len(REQUEST) + 1 + TAG)
    assert records(to_client)[-1] == (APPLICATION_DATA, len(REPLY) + 1 + TAG)


def test_the_probe_finds_kernel_tls() -> None:
    assert probe().available


@pytest.mark.parametrize(
    "suite",
    [
        CipherSuite.AES_128_GCM_SHA256,
        CipherSuite.AES_256_GCM_SHA384,
        CipherSuite.CHACHA20_POLY1305_SHA256,
    ],
    ids=lambda suite: suite.iana_name,
)
def test_every_suite_layout_is_the_kernels(suite: CipherSuite) -> None:
    """The kernel encrypts with our crypto_info as we decrypt, and decrypts what the same keys sealed."""
    keys = traffic_keys(suite, os.urandom(suite.hash_length))
    session = Session(suite, keys, keys, WEB, NOW)
    aead = ChaCha20Poly1305 if suite is CipherSuite.CHACHA20_POLY1305_SHA256 else AESGCM
    with socket.create_server(("127.0.0.1", 0)) as listener:
        sender = socket.create_connection(listener.getsockname()[:2], timeout=10)
        receiver, _ = listener.accept()
    with sender, receiver:
        receiver.settimeout(10)
        install(sender, session)
        sender.sendall(REQUEST)
        record = recv_exactly(receiver, 5 + len(REQUEST) + 1 + TAG)
        assert aead(keys.key).decrypt(keys.nonce(0), record[5:], record[:5]) == REQUEST + b"\x17"
        # The receiver takes over at the next record number and the kernel decrypts the reply.
        install(receiver, Session(suite, keys, keys, DB, NOW, tx_sequence=0, rx_sequence=1))
        sender.sendall(REPLY)
        assert recv_exactly(receiver, len(REPLY)) == REPLY
