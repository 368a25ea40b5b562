"""The kTLS relay: one workload connection carried between two nodes in a TLS 1.3 session of its own.

The dialing node (the source workload's), for a connection under an ``encrypt = "ktls"`` rule:

1. connects to the destination node's relay port and runs the handshake as the *source workload's* SVID,
   asking for, and accepting only, the destination's exact SPIFFE ID (:func:`authd.ktls.session.connect`);
2. hands both directions to kernel TLS (:func:`authd.ktls.kernel.install`);
3. sends the :class:`RelayHeader` (the connection's real source and destination) as the first record;
4. moves the bytes both ways with splice(2) through a pipe (:class:`Relay`): they go from one socket to
   the other inside the kernel, encrypted or decrypted by kernel TLS on the way, never read by Python.

The accepting node (the destination workload's) serves the handshake as the local identity the client's
server name selects, admits the client by the caller's authorizer (policy), reads the header (the only
bytes user space reads on a session), has the caller check it (the destination is an endpoint of the
selected identity, the source one of the client's), and connects to the destination *from the source's
real address* (``IP_TRANSPARENT``), so the destination sees its true peer. Then it splices both ways.

How a session ends, failing closed: the end of one side's stream becomes a TLS ``close_notify`` followed
by a FIN on the other. A kTLS stream that ends without ``close_notify`` may have been cut by someone on
the path, and any error is an error: then the workload's connection is reset (RST), never ended cleanly,
so a truncated transfer never looks complete to the workload.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from authd.config.schema import IpAddress
from authd.errors import KtlsError
from authd.identity import SpiffeId
from authd.ktls.kernel import SOL_TLS, install
from authd.ktls.session import PeerAuthorizer, Session, SvidSelector, accept, connect
from authd.x509svid import BundleSet, X509Svid

TLS_SET_RECORD_TYPE = 1  # cmsg type: send the next record with this content type
TLS_GET_RECORD_TYPE = 2  # cmsg type: the content type of the record recvmsg returned
_ALERT = 21
_CLOSE_NOTIFY = b"\x01\x00"  # alert level warning, description close_notify (RFC 8446 section 6.1)
_IP_TRANSPARENT = 19
_IPV6_TRANSPARENT = 75
_CHUNK = 1 << 16
_WAKE_US = 200_000  # a pump blocked on a socket looks at the abort flag this often

_HEADER = struct.Struct("!4sB16sH16sH")
_MAGIC = b"AKR\x01"  # authd kTLS relay, version 1
HEADER_SIZE = _HEADER.size


@dataclass(frozen=True, slots=True)
class RelayHeader:
    """The carried connection's real endpoints, as the dialing node captured them."""

    source: tuple[IpAddress, int]
    destination: tuple[IpAddress, int]

    def encode(self) -> bytes:
        """The fixed-size wire form."""
        (src, sport), (dst, dport) = self.source, self.destination
        if src.version != dst.version:
            raise KtlsError(f"ktls: relay header mixes address families ({src} to {dst})")
        return _HEADER.pack(_MAGIC, src.version, _packed(src), sport, _packed(dst), dport)

    @classmethod
    def decode(cls, data: bytes) -> RelayHeader:
        """Parse exactly one header; anything else is refused."""
        if len(data) != HEADER_SIZE:
            raise KtlsError(f"ktls: relay header of {len(data)} bytes, want {HEADER_SIZE}")
        magic, version, src, sport, dst, dport = _HEADER.unpack(data)
        if magic != _MAGIC:
            raise KtlsError(f"ktls: not a relay header (magic {magic.hex()})")
        if version not in (4, 6):
            raise KtlsError(f"ktls: relay header with address family {version}")
        if not (sport and dport):
            raise KtlsError("ktls: relay header with port 0")
        return cls((_unpacked(src, version), sport), (_unpacked(dst, version), dport))


def _packed(address: IpAddress) -> bytes:
    return address.packed.ljust(16, b"\0")


def _unpacked(raw: bytes, version: int) -> IpAddress:
    if version == 4:
        if any(raw[4:]):
            raise KtlsError("ktls: relay header with bytes past an IPv4 address")
        return ipaddress.IPv4Address(raw[:4])
    return ipaddress.IPv6Address(raw)


@dataclass(slots=True)
class RelayStats:
    """What a relay's sessions moved, and what user space had to read to do it."""

    spliced: int = 0
    """Payload bytes moved socket to socket by splice(2)."""
    user_bytes_read: int = 0
    """Bytes read into user space after the handshakes: the headers, and the records that end sessions."""
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, *, spliced: int = 0, read: int = 0) -> None:
        """Count, from any pump thread."""
        with self.lock:
            self.spliced += spliced
            self.user_bytes_read += read


def dial(
    node: tuple[str, int],
    svid: X509Svid,
    bundles: BundleSet,
    destination_id: SpiffeId,
    header: RelayHeader,
    *,
    at: datetime,
    timeout: float = 10.0,
) -> tuple[socket.socket, Session]:
    """Open a session to the relay at ``node`` for ``header``'s connection: ``svid`` to ``destination_id``.

    Returns the kTLS socket with the header already sent, and the session. Blocking: run it in a thread.
    """
    try:
        sock = socket.create_connection(node, timeout=timeout)
    except OSError as err:
        raise KtlsError(f"ktls: cannot reach the relay at {node[0]}:{node[1]}: {err}") from err
    try:
        session = connect(sock, svid, bundles, destination_id, at=at)
        install(sock, session)
        sock.sendall(header.encode())
    except BaseException:
        sock.close()
        raise
    return sock, session


HeaderCheck = Callable[[Session, RelayHeader], None]
"""Raises :class:`~authd.errors.KtlsError` unless the header's endpoints belong to the session's two IDs."""


def serve(
    sock: socket.socket,
    select: SvidSelector,
    bundles: BundleSet,
    authorize: PeerAuthorizer,
    check: HeaderCheck,
    stats: RelayStats,
    *,
    at: datetime,
) -> tuple[Session, RelayHeader]:
    """Accept one session on connected ``sock`` and read its header. Blocking: run it in a thread."""
    session = accept(sock, select, bundles, authorize, at=at)
    install(sock, session)
    header = RelayHeader.decode(_read_header(sock, stats))
    check(session, header)
    return session, header


def _read_header(sock: socket.socket, stats: RelayStats) -> bytes:
    data = b""
    while len(data) < HEADER_SIZE:
        try:
            chunk = sock.recv(HEADER_SIZE - len(data))
        except OSError as err:  # EINVAL: a control record where the header belongs
            raise KtlsError(f"ktls: reading the relay header failed: {err}") from err
        if not chunk:
            raise KtlsError("ktls: the session ended before its relay header")
        stats.add(read=len(chunk))
        data += chunk
    return data


def open_destination(header: RelayHeader, *, timeout: float = 10.0) -> socket.socket:
    """Connect to the header's destination from its source's own address and port (``IP_TRANSPARENT``)."""
    (source, sport), (destination, dport) = header.source, header.destination
    family = socket.AF_INET if source.version == 4 else socket.AF_INET6
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        if family == socket.AF_INET:
            sock.setsockopt(socket.SOL_IP, _IP_TRANSPARENT, 1)
        else:
            sock.setsockopt(socket.IPPROTO_IPV6, _IPV6_TRANSPARENT, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.settimeout(timeout)
        sock.bind((str(source), sport))
        sock.connect((str(destination), dport))
    except OSError as err:
        sock.close()
        raise KtlsError(f"ktls: cannot connect to {destination}:{dport} as {source}:{sport}: {err}") from err
    sock.settimeout(None)
    return sock


class Relay:
    """Splices one workload connection and its kTLS session both ways until both directions end."""

    def __init__(self, workload: socket.socket, session: socket.socket, stats: RelayStats) -> None:
        """Start the two pumps at once."""
        for sock in (workload, session):
            sock.settimeout(None)  # blocking, for splice; the kernel timeouts let a pump see an abort
            timeval = struct.pack("ll", 0, _WAKE_US)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
        self._workload, self._session, self._stats = workload, session, stats
        self._failed = threading.Event()
        self._threads = [
            threading.Thread(target=self._pump, args=(self._to_session,), name="ktls-relay-out", daemon=True),
            threading.Thread(target=self._pump, args=(self._to_workload,), name="ktls-relay-in", daemon=True),
        ]
        self._remaining = len(self._threads)
        self._lock = threading.Lock()
        self.done = threading.Event()
        for thread in self._threads:
            thread.start()

    @property
    def reset(self) -> bool:
        """Whether the workload's connection was reset (an error, or a session cut short)."""
        return self._failed.is_set()

    def abort(self) -> None:
        """End both sides now: the workload sees a reset (its identity was revoked, or authd stops)."""
        self._fail()

    def join(self, timeout: float | None = None) -> None:
        """Wait for both pumps."""
        for thread in self._threads:
            thread.join(timeout)

    def _pump(self, direction: Callable[[int, int], None]) -> None:
        read_end, write_end = os.pipe2(os.O_CLOEXEC)
        try:
            direction(read_end, write_end)
        except (OSError, KtlsError):
            self._fail()
        finally:
            os.close(read_end)
            os.close(write_end)
            with self._lock:
                self._remaining -= 1
                last = self._remaining == 0
            if last:
                self._close()

    def _to_session(self, read_end: int, write_end: int) -> None:
        """Workload to session: at the workload's end of stream, close_notify and a FIN."""
        if self._splice_until_eof(self._workload, self._session, read_end, write_end):
            return
        self._session.sendmsg([_CLOSE_NOTIFY], [(SOL_TLS, TLS_SET_RECORD_TYPE, bytes([_ALERT]))])
        self._session.shutdown(socket.SHUT_WR)

    def _to_workload(self, read_end: int, write_end: int) -> None:
        """Session to workload: only a close_notify ends the workload's stream cleanly."""
        if self._splice_until_eof(self._session, self._workload, read_end, write_end, control=self._control):
            return
        raise KtlsError("ktls: the session ended without close_notify")

    def _splice_until_eof(
        self,
        source: socket.socket,
        sink: socket.socket,
        read_end: int,
        write_end: int,
        control: Callable[[], bool] | None = None,
    ) -> bool:
        """Splice until end of stream: False at EOF, True if ``control`` said the stream ended cleanly."""
        while True:
            try:
                count = self._splice(source.fileno(), write_end, _CHUNK)
            except OSError as err:
                if control is None or err.errno != errno.EINVAL:
                    raise
                if control():  # a record that is not application data stopped the splice
                    sink.shutdown(socket.SHUT_WR)
                    return True
                continue
            if count == 0:
                if self._failed.is_set():
                    raise KtlsError("ktls: the relay was aborted")
                return False
            self._stats.add(spliced=count)
            while count:
                count -= self._splice(read_end, sink.fileno(), count)

    def _splice(self, source: int, sink: int, count: int) -> int:
        """One splice(2), retried while a kernel timeout or a signal interrupts it, until an abort."""
        while True:
            if self._failed.is_set():
                raise KtlsError("ktls: the relay was aborted")
            try:
                return os.splice(source, sink, count)
            except BlockingIOError:
                continue

    def _control(self) -> bool:
        """Read the control record that stopped the splice: True for close_notify; anything else fails."""
        data, ancillary, _flags, _address = self._session.recvmsg(_CHUNK, socket.CMSG_SPACE(1))
        self._stats.add(read=len(data))
        kinds = [value for level, kind, value in ancillary if (level, kind) == (SOL_TLS, TLS_GET_RECORD_TYPE)]
        if kinds == [bytes([_ALERT])] and data == _CLOSE_NOTIFY:
            return True
        raise KtlsError(f"ktls: the session sent a record of type {kinds} ({data[:2].hex()}), not data")

    def _fail(self) -> None:
        if self._failed.is_set():
            return
        self._failed.set()
        # The workload gets a RST, never a FIN it could take for the end of the stream: no linger, so
        # the close in _close resets; shutting down only its reading side wakes the pumps and sends
        # nothing. The far relay sees the session end without close_notify, and resets its side too.
        with contextlib.suppress(OSError):
            self._workload.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self._workload.shutdown(socket.SHUT_RD)
        with contextlib.suppress(OSError):
            self._session.shutdown(socket.SHUT_RDWR)

    def _close(self) -> None:
        self._workload.close()
        self._session.close()
        self.done.set()
