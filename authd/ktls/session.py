"""A kTLS session's handshake: TLS 1.3 in user space, mutual SVID authentication, traffic keys out.

:func:`handshake` runs TLS 1.3 over a connected TCP socket with OpenSSL (Python's ``ssl``), each side
presenting its workload's X509-SVID. The peer is accepted only by
:func:`authd.x509svid.verify_chain`: its exact expected SPIFFE ID, verified against the bundle of its
own trust domain. The result is a :class:`Session`: the negotiated suite and both directions' traffic
keys, ready for kernel TLS (:mod:`authd.ktls.socket`), and the record sequence numbers to start from.

How the keys come out, and the traps avoided:

- OpenSSL writes the traffic secrets to a key log (the NSS format, ``CLIENT_TRAFFIC_SECRET_0``...).
  Python has no per-connection key-log callback, so each handshake has a context of its own whose key
  log is an anonymous memory file (memfd): the secrets never touch a disk, and the log holds exactly one
  handshake. The keys follow from the secrets by :mod:`authd.ktls.keys`.
- The handshake runs over memory BIOs, and the socket is read one whole TLS record at a time, never
  further: bytes the peer sends right after the handshake, already under kernel TLS, stay in the socket
  for the kernel to decrypt instead of being swallowed by OpenSSL.
- The server sends no session tickets (``num_tickets = 0``). A NewSessionTicket is a record under the
  application keys: it would move the server's sequence number to 1 and sit unread in front of the
  client's kernel. With none, and no application data through OpenSSL, both directions start at 0.
- The client checks the server's SVID before it sends its own certificate and Finished: a refused server
  learns nothing more. The server checks the client's after the handshake and sends nothing after it.
- The client names the identity it wants by its server name (:func:`authd.identity.sni_for`). A server
  holding several identities (:func:`accept`) presents the one that name selects, and refuses the
  handshake (``unrecognized_name``) when it selects none; it then admits the client by an authorizer that
  sees both identities, so which clients may reach which local identity is decided by the caller.

Blocking: the socket's own timeout bounds each read and write; callers run this in a worker thread.
"""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from authd.attest.tls import client_context, peer_chain, server_context
from authd.errors import AttestError, KtlsError, SvidError
from authd.identity import SpiffeId, sni_for
from authd.ktls.keys import CipherSuite, TrafficKeys, traffic_keys
from authd.x509svid import BundleSet, X509Svid, authorize_id, spiffe_id_of, verify_chain

SvidSelector = Callable[[str | None], X509Svid | None]
"""The SVID a server presents for a client's server name (None: it sent none); None refuses."""

PeerAuthorizer = Callable[[SpiffeId, SpiffeId], None]
"""``(local, peer)``: raises :class:`~authd.errors.SvidError` unless ``peer`` may reach ``local``."""

RECORD_HEADER = 5
MAX_RECORD = (1 << 14) + 256  # the largest TLSCiphertext fragment (RFC 8446 section 5.2)
_CONTENT_TYPES = frozenset({20, 21, 22, 23})  # change_cipher_spec, alert, handshake, application_data
_LEGACY_VERSIONS = frozenset({0x0301, 0x0303})  # a ClientHello may say 1.0; everything else says 1.2


@dataclass(frozen=True, slots=True)
class Session:
    """One side's view of a finished handshake: what kernel TLS needs for both directions.

    ``tx`` protects what this side sends, ``rx`` what it receives; ``*_sequence`` are the numbers of the
    next record in each direction. ``not_after``: the earlier expiry of the two SVIDs, which the keys
    must not outlive.
    """

    suite: CipherSuite
    tx: TrafficKeys
    rx: TrafficKeys
    peer: SpiffeId
    not_after: datetime
    tx_sequence: int = 0
    rx_sequence: int = 0
    local: SpiffeId | None = None
    """The identity this side presented (set by :func:`accept`, which chooses it)."""


def handshake(
    sock: socket.socket,
    svid: X509Svid,
    bundles: BundleSet,
    peer: SpiffeId,
    *,
    server: bool,
    at: datetime,
) -> Session:
    """Run the handshake on connected ``sock`` as ``svid``; accept only ``peer``, verified at ``at``."""
    if server:
        return accept(sock, lambda _name: svid, bundles, _exactly(peer), at=at)
    return connect(sock, svid, bundles, peer, at=at)


def connect(
    sock: socket.socket, svid: X509Svid, bundles: BundleSet, peer: SpiffeId, *, at: datetime
) -> Session:
    """Open the handshake on ``sock`` as ``svid``, asking for ``peer`` by name; accept only ``peer``."""
    return _handshake(sock, svid, None, bundles, _exactly(peer), at=at, name=peer)


def _exactly(peer: SpiffeId) -> PeerAuthorizer:
    check = authorize_id(peer)
    return lambda _local, actual: check(actual)


def accept(
    sock: socket.socket, select: SvidSelector, bundles: BundleSet, authorize: PeerAuthorizer, *, at: datetime
) -> Session:
    """Serve the handshake on ``sock`` as the SVID ``select`` picks by server name; admit by ``authorize``."""
    return _handshake(sock, None, select, bundles, authorize, at=at)


def _handshake(
    sock: socket.socket,
    svid: X509Svid | None,
    select: SvidSelector | None,
    bundles: BundleSet,
    authorize: PeerAuthorizer,
    *,
    at: datetime,
    name: SpiffeId | None = None,
) -> Session:
    """The client presents ``svid``; the server (``select`` given) the SVID its client's name selects."""
    server = select is not None
    keylog = os.memfd_create("authd-ktls-keylog", os.MFD_CLOEXEC)
    keylog_path = f"/proc/self/fd/{keylog}"
    chosen: list[X509Svid] = [] if svid is None else [svid]
    try:
        if select is not None:
            context = _selecting_context(select, bundles, keylog_path, chosen)
        else:
            assert svid is not None  # a client always presents its own
            context = _context_for(svid, bundles, keylog_path, server=False)
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        hostname = None if name is None else sni_for(name)
        tls = context.wrap_bio(incoming, outgoing, server_side=server, server_hostname=hostname)
        _run(sock, tls, incoming, outgoing)
        if not chosen:
            raise KtlsError("ktls: the handshake ended without choosing an identity to present")
        local = chosen[0]
        if tls.version() != "TLSv1.3":
            raise KtlsError(f"ktls: negotiated {tls.version()}, not TLS 1.3")
        suite = CipherSuite.named(tls.cipher()[0])  # type: ignore[index]  # set once the handshake is done
        peer, peer_expiry = _verify_peer(tls, bundles, local.spiffe_id, authorize, at)
        not_after = min(local.not_after, peer_expiry)
        _flush(sock, outgoing)  # the client's certificate and Finished, once the server is accepted
        if incoming.pending or tls.pending():
            raise KtlsError("ktls: bytes past the handshake were read into user space")
        secrets = _traffic_secrets(keylog)
    finally:
        os.close(keylog)
    client = traffic_keys(suite, secrets["CLIENT_TRAFFIC_SECRET_0"])
    server_keys = traffic_keys(suite, secrets["SERVER_TRAFFIC_SECRET_0"])
    tx, rx = (server_keys, client) if server else (client, server_keys)
    return Session(suite, tx, rx, peer, not_after, local=local.spiffe_id)


def _context_for(svid: X509Svid, bundles: BundleSet, keylog_path: str, *, server: bool) -> ssl.SSLContext:
    try:
        context = server_context(svid, bundles) if server else client_context(svid, bundles)
    except AttestError as err:
        raise KtlsError(f"ktls: cannot build a TLS context from {svid.spiffe_id}'s SVID: {err}") from err
    context.keylog_filename = keylog_path
    if server:
        context.num_tickets = 0
    return context


def _selecting_context(
    select: SvidSelector, bundles: BundleSet, keylog_path: str, chosen: list[X509Svid]
) -> ssl.SSLContext:
    """A server context with no identity of its own: the client's server name picks one, or none."""
    first = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    first.minimum_version = first.maximum_version = ssl.TLSVersion.TLSv1_3
    # The SSL object keeps the first context's settings but for the certificate, which the chosen one
    # gives: the certificate request and the number of tickets (none, see the module docstring).
    first.verify_mode = ssl.CERT_REQUIRED
    first.options |= ssl.OP_NO_TICKET
    first.num_tickets = 0

    def pick(tls: ssl.SSLObject, name: str | None, _context: ssl.SSLContext) -> int | None:
        svid = select(name)
        if svid is None:
            return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
        try:
            tls.context = _context_for(svid, bundles, keylog_path, server=True)
        except KtlsError:
            return ssl.ALERT_DESCRIPTION_INTERNAL_ERROR
        chosen.append(svid)
        return None

    first.sni_callback = pick
    return first


def _run(sock: socket.socket, tls: ssl.SSLObject, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO) -> None:
    """Drive the handshake until done, feeding it one whole record at a time.

    What the last step wrote stays in ``outgoing``: the caller sends it once the peer is verified.
    """
    while True:
        try:
            tls.do_handshake()
        except ssl.SSLWantReadError:
            _flush(sock, outgoing)
            incoming.write(_read_record(sock))
        except ssl.SSLError as err:
            with contextlib.suppress(KtlsError):  # the handshake failed: that is the error to report
                _flush(sock, outgoing)  # the alert that tells the peer why
            raise KtlsError(f"ktls: TLS handshake failed: {err.reason or err}") from err
        else:
            return


def _verify_peer(
    tls: ssl.SSLObject, bundles: BundleSet, local: SpiffeId, authorize: PeerAuthorizer, at: datetime
) -> tuple[SpiffeId, datetime]:
    """Verify the peer's chain as SPIFFE says; return its ID and its leaf's expiry."""
    try:
        chain = peer_chain(tls)
        verify_chain(chain, bundles, at=at, authorize=lambda actual: authorize(local, actual))
        return spiffe_id_of(chain[0]), chain[0].not_valid_after_utc
    except (SvidError, AttestError) as err:
        raise KtlsError(f"ktls: peer refused by {local}: {err}") from err


def _read_record(sock: socket.socket) -> bytes:
    """Read exactly one TLS record from ``sock``; refuse what is not one."""
    header = _read_exactly(sock, RECORD_HEADER)
    length = int.from_bytes(header[3:5], "big")
    if (
        header[0] not in _CONTENT_TYPES
        or int.from_bytes(header[1:3], "big") not in _LEGACY_VERSIONS
        or not 0 < length <= MAX_RECORD
    ):
        raise KtlsError(f"ktls: the peer sent something that is not a TLS record (header {header.hex()})")
    return header + _read_exactly(sock, length)


def _read_exactly(sock: socket.socket, count: int) -> bytes:
    data = bytearray()
    while len(data) < count:
        try:
            chunk = sock.recv(count - len(data))
        except OSError as err:
            raise KtlsError(f"ktls: reading the handshake failed: {err}") from err
        if not chunk:
            raise KtlsError("ktls: the peer closed the connection during the handshake")
        data += chunk
    return bytes(data)


def _flush(sock: socket.socket, outgoing: ssl.MemoryBIO) -> None:
    data = outgoing.read()
    if data:
        try:
            sock.sendall(data)
        except OSError as err:
            raise KtlsError(f"ktls: writing the handshake failed: {err}") from err


def _traffic_secrets(keylog: int) -> dict[str, bytes]:
    """The application traffic secrets of the one handshake in the key log."""
    size = os.fstat(keylog).st_size
    text = os.pread(keylog, size, 0).decode("ascii", errors="replace")
    secrets: dict[str, bytes] = {}
    randoms = set()
    for line in text.splitlines():
        parts = line.split()
        if len(parts) != 3 or line.startswith("#"):
            continue
        label, client_random, secret = parts
        randoms.add(client_random)
        if label in ("CLIENT_TRAFFIC_SECRET_0", "SERVER_TRAFFIC_SECRET_0"):
            secrets[label] = bytes.fromhex(secret)
    if len(randoms) != 1 or len(secrets) != 2:
        raise KtlsError("ktls: the key log does not hold exactly one handshake's traffic secrets")
    return secrets
