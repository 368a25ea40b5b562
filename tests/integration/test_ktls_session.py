"""kTLS session handshakes between two sockets on loopback, with real OpenSSL on both ends.

No kernel TLS is needed: the keys :func:`handshake` extracts open the records OpenSSL itself protects
right after the handshake, in each direction, which proves the key schedule and the sequence numbers
the kernel would be given.
"""

from __future__ import annotations

import datetime as dt
import socket
import threading
from collections.abc import Callable, Iterator
from typing import TypeVar

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from authd.attest.tls import client_context, server_context
from authd.errors import KtlsError, SvidError
from authd.identity import SpiffeId, sni_for
from authd.ktls.keys import CipherSuite, TrafficKeys
from authd.ktls.session import Session, accept, connect, handshake
from authd.x509svid import BundleSet, X509Svid
from tests.fakes.ca import LeafOptions
from tests.fakes.ca import TestCA as FakeCA

T = TypeVar("T")
NOW = dt.datetime.now(dt.UTC)
WEB = SpiffeId.parse("spiffe://example.org/ns/shop/sa/web")
DB = SpiffeId.parse("spiffe://example.org/ns/shop/sa/db")
MARKER = b"authd-ktls-marker: nobody on the wire may read this"


@pytest.fixture(scope="module")
def ca() -> FakeCA:
    return FakeCA.create("example.org", not_before=NOW - dt.timedelta(days=1))


def svid(ca: FakeCA, spiffe_id: SpiffeId, hours: float = 1) -> X509Svid:
    validity = LeafOptions(not_before=NOW - dt.timedelta(hours=1), not_after=NOW + dt.timedelta(hours=hours))
    return ca.mint(str(spiffe_id), validity)


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """A connected TCP pair on loopback: (client, server), each with a 10 s timeout."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname(), timeout=10)
        server, _ = listener.accept()
    server.settimeout(10)
    with client, server:
        yield client, server


def in_thread(work: Callable[[], T]) -> Callable[[], T]:
    """Start ``work`` in a thread; the returned call joins it and returns or raises what it did."""
    outcome: list[T] = []
    failure: list[BaseException] = []

    def target() -> None:
        try:
            outcome.append(work())
        except BaseException as err:  # noqa: BLE001 - handed to the joining test
            failure.append(err)

    thread = threading.Thread(target=target)
    thread.start()

    def join() -> T:
        thread.join(30)
        if failure:
            raise failure[0]
        return outcome[0]

    return join


def read_record(sock: socket.socket) -> bytes:
    data = b""
    while len(data) < 5 or len(data) < 5 + int.from_bytes(data[3:5], "big"):
        chunk = sock.recv(
            5 + int.from_bytes(data[3:5], "big") - len(data) if len(data) >= 5 else 5 - len(data)
        )
        assert chunk, "the peer closed the connection"
        data += chunk
    return data


def open_record(keys: TrafficKeys, sequence: int, record: bytes) -> bytes:
    aead = ChaCha20Poly1305 if keys.suite is CipherSuite.CHACHA20_POLY1305_SHA256 else AESGCM
    return aead(keys.key).decrypt(keys.nonce(sequence), record[5:], record[:5])


def test_both_ends_derive_mirrored_keys(ca: FakeCA, pair: tuple[socket.socket, socket.socket]) -> None:
    bundles = BundleSet.of([ca.bundle()])
    client_sock, server_sock = pair
    web, db = svid(ca, WEB), svid(ca, DB, hours=2)
    server = in_thread(lambda: handshake(server_sock, db, bundles, WEB, server=True, at=NOW))
    client = handshake(client_sock, web, bundles, DB, server=False, at=NOW)
    served = server()
    assert (client.peer, served.peer) == (DB, WEB)
    assert client.suite is served.suite
    assert (client.tx, client.rx) == (served.rx, served.tx)
    assert client.tx != client.rx
    assert (client.tx_sequence, client.rx_sequence, served.tx_sequence, served.rx_sequence) == (0, 0, 0, 0)
    # The keys never outlive the shorter-lived SVID (web's, here), on either side.
    assert client.not_after == served.not_after == web.not_after
    # Nothing past the handshake was read into user space, nor is any ticket waiting.
    client_sock.settimeout(0.1)
    with pytest.raises(TimeoutError):
        client_sock.recv(1)


def test_the_server_keys_open_the_first_record_an_openssl_client_sends(
    ca: FakeCA, pair: tuple[socket.socket, socket.socket]
) -> None:
    bundles = BundleSet.of([ca.bundle()])
    client_sock, server_sock = pair
    server = in_thread(lambda: handshake(server_sock, svid(ca, DB), bundles, WEB, server=True, at=NOW))
    with client_context(svid(ca, WEB), bundles).wrap_socket(client_sock) as tls:
        tls.sendall(MARKER)
        session: Session = server()
        record = read_record(server_sock)
    assert record[0] == 23  # application data on the wire; the content type is inside
    assert MARKER not in record
    assert open_record(session.rx, session.rx_sequence, record) == MARKER + b"\x17"


def test_the_client_keys_open_the_first_record_an_openssl_server_sends(
    ca: FakeCA, pair: tuple[socket.socket, socket.socket]
) -> None:
    bundles = BundleSet.of([ca.bundle()])
    client_sock, server_sock = pair
    context = server_context(svid(ca, DB), bundles)
    context.num_tickets = 0

    def serve() -> None:
        with context.wrap_socket(server_sock, server_side=True) as tls:
            tls.sendall(MARKER)
            tls.recv(1)  # hold the connection until the client has read

    server = in_thread(serve)
    session = handshake(client_sock, svid(ca, WEB), bundles, DB, server=False, at=NOW)
    record = read_record(client_sock)
    client_sock.close()
    server()
    assert MARKER not in record
    assert open_record(session.rx, session.rx_sequence, record) == MARKER + b"\x17"
    with pytest.raises(InvalidTag):
        open_record(session.rx, session.rx_sequence + 1, record)


def test_a_server_with_another_identity_is_refused_before_the_client_finishes(
    ca: FakeCA, pair: tuple[socket.socket, socket.socket]
) -> None:
    bundles = BundleSet.of([ca.bundle()])
    client_sock, server_sock = pair
    impostor = SpiffeId.parse("spiffe://example.org/ns/shop/sa/cache")
    server = in_thread(lambda: handshake(server_sock, svid(ca, impostor), bundles, WEB, server=True, at=NOW))
    with pytest.raises(KtlsError, match=f'peer refused by {WEB}: .*unexpected ID "{impostor}"'):
        handshake(client_sock, svid(ca, WEB), bundles, DB, server=False, at=NOW)
    client_sock.close()
    with pytest.raises(KtlsError, match="closed the connection during the handshake"):
        server()  # the client never sent its certificate or Finished


def test_a_client_with_another_identity_is_refused(
    ca: FakeCA, pair: tuple[socket.socket, socket.socket]
) -> None:
    bundles = BundleSet.of([ca.bundle()])
    client_sock, server_sock = pair
    server = in_thread(lambda: handshake(server_sock, svid(ca, DB), bundles, WEB, server=True, at=NOW))
    intruder = SpiffeId.parse("spiffe://example.org/ns/shop/sa/intruder")
    handshake(client_sock, svid(ca, intruder), bundles, DB, server=False, at=NOW)
    with pytest.raises(KtlsError, match=f"peer refused by {DB}: .*unexpected ID"):
        server()


def test_a_client_from_an_untrusted_ca_is_refused(
    ca: FakeCA, pair: tuple[socket.socket, socket.socket]
) -> None:
    bundles = BundleSet.of([ca.bundle()])
    client_sock, server_sock = pair
    stranger = FakeCA.create("example.org", not_before=NOW - dt.timedelta(days=1))
    server = in_thread(lambda: handshake(server_sock, svid(ca, DB), bundles, WEB, server=True, at=NOW))
    # The client trusts the server; its own SVID comes from a CA the server's trust domain never had.
    handshake(client_sock, svid(stranger, WEB), bundles, DB, server=False, at=NOW)
    with pytest.raises(KtlsError, match="TLS handshake failed"):
        server()  # OpenSSL's store refuses it first


def test_bytes_that_are_not_tls_are_refused(ca: FakeCA, pair: tuple[socket.socket, socket.socket]) -> None:
    client_sock, server_sock = pair
    client_sock.sendall(b"GET / HTTP/1.1\r\n\r\n")
    with pytest.raises(KtlsError, match="not a TLS record"):
        handshake(server_sock, svid(ca, DB), BundleSet.of([ca.bundle()]), WEB, server=True, at=NOW)


def test_a_server_with_several_identities_presents_the_one_the_client_names(
    ca: FakeCA, pair: tuple[socket.socket, socket.socket]
) -> None:
    bundles = BundleSet.of([ca.bundle()])
    client_sock, server_sock = pair
    cache = SpiffeId.parse("spiffe://example.org/ns/shop/sa/cache")
    held = {sni_for(spiffe_id): svid(ca, spiffe_id) for spiffe_id in (DB, cache)}
    seen: list[tuple[SpiffeId, SpiffeId]] = []

    def authorize(local: SpiffeId, peer: SpiffeId) -> None:
        seen.append((local, peer))

    server = in_thread(
        lambda: accept(server_sock, lambda name: held.get(name or ""), bundles, authorize, at=NOW)
    )
    client = connect(client_sock, svid(ca, WEB), bundles, cache, at=NOW)
    served = server()
    assert (served.local, served.peer, client.peer) == (cache, WEB, cache)
    assert seen == [(cache, WEB)]  # the authorizer decides with both identities in hand
    assert served.rx == client.tx


def test_a_name_the_server_holds_no_identity_for_ends_the_handshake(
    ca: FakeCA, pair: tuple[socket.socket, socket.socket]
) -> None:
    bundles = BundleSet.of([ca.bundle()])
    client_sock, server_sock = pair
    held = {sni_for(DB): svid(ca, DB)}
    server = in_thread(
        lambda: accept(server_sock, lambda name: held.get(name or ""), bundles, lambda _l, _p: None, at=NOW)
    )
    stranger = SpiffeId.parse("spiffe://example.org/ns/shop/sa/stranger")
    with pytest.raises(KtlsError, match="UNRECOGNIZED_NAME"):
        connect(client_sock, svid(ca, WEB), bundles, stranger, at=NOW)
    with pytest.raises(KtlsError, match="TLS handshake failed"):
        server()


def test_a_client_the_authorizer_refuses_gets_no_session(
    ca: FakeCA, pair: tuple[socket.socket, socket.socket]
) -> None:
    bundles = BundleSet.of([ca.bundle()])
    client_sock, server_sock = pair
    held = {sni_for(DB): svid(ca, DB)}

    def refuse(local: SpiffeId, peer: SpiffeId) -> None:
        raise SvidError("not-allowed", f"{peer} may not reach {local} under kTLS")

    server = in_thread(
        lambda: accept(server_sock, lambda name: held.get(name or ""), bundles, refuse, at=NOW)
    )
    connect(client_sock, svid(ca, WEB), bundles, DB, at=NOW)  # the client's view ends at its Finished
    with pytest.raises(KtlsError, match=f"peer refused by {DB}: .*may not reach"):
        server()
