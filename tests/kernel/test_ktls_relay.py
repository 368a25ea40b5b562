"""The kTLS relay in the guest's kernel: a workload connection carried in a session keyed from two SVIDs.

On loopback, each role at an address of its own: the source workload (web, 127.0.0.2), the dialing
relay's listener standing in for the capture (127.0.0.5), the accepting relay (127.0.0.3, reached
through a wire tap that keeps every byte), and the destination workload (db, 127.0.0.4). The dialing
relay carries the connection as web's SVID to db's exact ID; the accepting relay presents db's SVID,
admits web by policy, checks the header, and connects to db from web's own address and port.
"""

from __future__ import annotations

import datetime as dt
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from ipaddress import ip_address

import pytest

from authd.errors import KtlsError, SvidError
from authd.identity import SpiffeId, sni_for
from authd.ktls.kernel import tls_stat
from authd.ktls.relay import HEADER_SIZE, Relay, RelayHeader, RelayStats, dial, open_destination, serve
from authd.ktls.session import Session
from authd.x509svid import BundleSet, X509Svid
from tests.fakes.ca import LeafOptions
from tests.fakes.ca import TestCA as FakeCA
from tests.kernel.wire import WireTap, records

NOW = dt.datetime.now(dt.UTC)
WEB = SpiffeId.parse("spiffe://example.org/ns/shop/sa/web")
DB = SpiffeId.parse("spiffe://example.org/ns/shop/sa/db")
CACHE = SpiffeId.parse("spiffe://example.org/ns/shop/sa/cache")
WEB_ADDRESS, DB_ADDRESS = "127.0.0.2", "127.0.0.4"
MARKER = b"authd-ktls-relay-marker "
APPLICATION_DATA = 23


@dataclass
class Destination:
    """db: accepts connections, records their peers, and echoes what it receives in upper case."""

    listener: socket.socket = field(default_factory=lambda: socket.create_server((DB_ADDRESS, 0)))
    peers: list[tuple[str, int]] = field(default_factory=list)
    received: bytearray = field(default_factory=bytearray)
    ended_cleanly: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.listener.settimeout(20)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    @property
    def address(self) -> tuple[str, int]:
        return self.listener.getsockname()[:2]  # type: ignore[no-any-return]

    def _serve(self) -> None:
        try:
            conn, peer = self.listener.accept()
        except OSError:
            return
        self.peers.append(peer[:2])
        with conn:
            try:
                while chunk := conn.recv(65536):
                    self.received += chunk
                    conn.sendall(chunk.upper())
                self.ended_cleanly.set()
            except OSError:
                return


@dataclass
class Node:
    """The two relays, and what each one moved."""

    ca: FakeCA
    destination: Destination
    allowed: frozenset[SpiffeId] = frozenset({WEB})
    dial_stats: RelayStats = field(default_factory=RelayStats)
    serve_stats: RelayStats = field(default_factory=RelayStats)
    relays: list[Relay] = field(default_factory=list)
    captured: list[socket.socket] = field(default_factory=list)
    sessions: list[Session] = field(default_factory=list)
    refusals: list[BaseException] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.bundles = BundleSet.of([self.ca.bundle()])
        self.held = {sni_for(DB): svid(self.ca, DB)}
        self.listener = socket.create_server(("127.0.0.3", 0))
        self.tap = WireTap(self.listener.getsockname()[:2])
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def authorize(self, local: SpiffeId, peer: SpiffeId) -> None:
        if local != DB or peer not in self.allowed:
            raise SvidError("not-allowed", f"no kTLS rule lets {peer} reach {local}")

    def check(self, session: Session, header: RelayHeader) -> None:
        """The header's endpoints must be the two identities' (here: one address each)."""
        if (str(header.source[0]), str(header.destination[0])) != (WEB_ADDRESS, DB_ADDRESS):
            raise KtlsError(f"ktls: {header} does not belong to {session.peer} and {session.local}")

    def _accept(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        conn.settimeout(10)
        try:
            session, header = serve(
                conn,
                lambda name: self.held.get(name or ""),
                self.bundles,
                self.authorize,
                self.check,
                self.serve_stats,
                at=NOW,
            )
            self.sessions.append(session)
            self.relays.append(Relay(open_destination(header), conn, self.serve_stats))
        except (KtlsError, OSError) as err:
            self.refusals.append(err)
            conn.close()

    def carry(self, workload: socket.socket, as_svid: X509Svid, source: tuple[str, int]) -> Relay:
        """The dialing side, for a connection the capture handed over."""
        header = RelayHeader(
            (ip_address(source[0]), source[1]),
            (ip_address(self.destination.address[0]), self.destination.address[1]),
        )
        session, _ = dial(self.tap.listener.getsockname()[:2], as_svid, self.bundles, DB, header, at=NOW)
        relay = Relay(workload, session, self.dial_stats)
        self.relays.append(relay)
        return relay

    def close(self) -> None:
        for relay in self.relays:
            relay.abort()
            relay.join(5)
        for sock in self.captured:
            sock.close()
        self.listener.close()
        self.tap.close()
        self.destination.listener.close()


def svid(ca: FakeCA, spiffe_id: SpiffeId) -> X509Svid:
    validity = LeafOptions(not_before=NOW - dt.timedelta(hours=1), not_after=NOW + dt.timedelta(hours=1))
    return ca.mint(str(spiffe_id), validity)


@pytest.fixture
def node() -> Iterator[Node]:
    ca = FakeCA.create("example.org", not_before=NOW - dt.timedelta(days=1))
    node = Node(ca, Destination())
    try:
        yield node
    finally:
        node.close()


def workload_connection(node: Node, as_svid: X509Svid) -> tuple[socket.socket, Callable[[], Relay]]:
    """web's socket, connected to the capture's stand-in; the returned call hands it to the relay."""
    with socket.create_server(("127.0.0.5", 0)) as capture:
        web = socket.socket()
        # The relay's side binds web's address and port again, as the capture would in another netns.
        web.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        web.bind((WEB_ADDRESS, 0))
        web.settimeout(20)
        web.connect(capture.getsockname()[:2])
        captured, source = capture.accept()
    node.captured.append(captured)
    return web, lambda: node.carry(captured, as_svid, source[:2])


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        assert chunk, f"closed after {len(data)} of {size} bytes"
        data += chunk
    return bytes(data)


def test_a_carried_connection_is_encrypted_in_the_kernel_and_reaches_its_true_peer(node: Node) -> None:
    before = tls_stat()
    web, carry = workload_connection(node, svid(node.ca, WEB))
    web_address = web.getsockname()[:2]
    with web:
        carry()
        payload = MARKER * 40_000  # about 1 MB each way
        sender = threading.Thread(target=web.sendall, args=(payload,))
        sender.start()
        assert recv_exactly(web, len(payload)) == payload.upper()
        sender.join()
        web.shutdown(socket.SHUT_WR)  # web's end of stream reaches db as a clean end...
        assert node.destination.ended_cleanly.wait(10)
        assert web.recv(1) == b""  # ...and db's, web
    for relay in node.relays:
        assert relay.done.wait(10)
        assert not relay.reset

    # db saw web's own address and port, and the session was db's SVID admitting web's.
    assert node.destination.peers == [web_address]
    assert [(s.local, s.peer) for s in node.sessions] == [(DB, WEB)]

    # On the wire: whole TLS records only, application data at the end, the marker in neither direction.
    for direction in ("to-server", "to-client"):
        wire = bytes(node.tap.wire[direction])
        assert MARKER not in wire
        assert {kind for kind, _ in records(wire)[3:]} <= {APPLICATION_DATA}

    # Both sessions ran in kernel TLS, TX and RX; nothing failed to decrypt.
    after = tls_stat()
    assert after["TlsTxSw"] - before["TlsTxSw"] == 2
    assert after["TlsRxSw"] - before["TlsRxSw"] == 2
    assert after["TlsDecryptError"] == before["TlsDecryptError"]

    # The payload went socket to socket: user space read the header and the two close_notify alerts.
    assert node.dial_stats.spliced == node.serve_stats.spliced == 2 * len(payload)
    assert node.serve_stats.user_bytes_read == HEADER_SIZE + 2
    assert node.dial_stats.user_bytes_read == 2


def test_a_session_cut_on_the_wire_resets_both_workloads(node: Node) -> None:
    web, carry = workload_connection(node, svid(node.ca, WEB))
    with web:
        carry()
        web.sendall(MARKER)
        assert recv_exactly(web, len(MARKER)) == MARKER.upper()
        node.tap.close()  # someone on the path ends the TCP session: no close_notify
        with pytest.raises(ConnectionResetError):
            web.recv(65536)
    assert not node.destination.ended_cleanly.wait(2)  # db never took the cut for the end of the stream
    assert all(relay.reset for relay in node.relays)


def test_an_impostor_with_another_identity_never_reaches_the_destination(node: Node) -> None:
    web, carry = workload_connection(node, svid(node.ca, CACHE))  # cache's SVID, web's connection
    with web:
        relay = carry()  # the client's view of the handshake ends at its Finished: the refusal comes after
        with pytest.raises(ConnectionResetError):  # a session ended without close_notify: reset
            web.recv(1)
        assert relay.done.wait(10)
        assert relay.reset
    node.thread.join(10)
    assert node.refusals, "the accepting relay admitted cache"
    assert "no kTLS rule lets" in str(node.refusals[0])
    assert node.destination.peers == []


def test_a_header_that_claims_another_source_is_refused(node: Node) -> None:
    web, _ = workload_connection(node, svid(node.ca, WEB))
    with web:
        forged = RelayHeader(
            (ip_address("127.0.0.9"), 4000), (ip_address(DB_ADDRESS), node.destination.address[1])
        )
        tap = node.tap.listener.getsockname()[:2]
        session, _ = dial(tap, svid(node.ca, WEB), node.bundles, DB, forged, at=NOW)
        with session:
            node.thread.join(10)
    assert node.refusals
    assert "does not belong to" in str(node.refusals[0])
    assert node.destination.peers == []
