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

Blocking: the socket's own timeout bounds each read and write; callers run this in a worker thread.
"""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
from dataclasses import dataclass
from datetime import datetime

from authd.attest.tls import client_context, peer_chain, server_context
from authd.errors import AttestError, KtlsError, SvidError
from authd.identity import SpiffeId
from authd.ktls.keys import CipherSuite, TrafficKeys, traffic_keys
from authd.x509svid import BundleSet, X509Svid, authorize_id, verify_chain

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
    keylog = os.memfd_create("authd-ktls-keylog", os.MFD_CLOEXEC)
    try:
        try:
            context = server_context(svid, bundles) if server else client_context(svid, bundles)
        except AttestError as err:
            raise KtlsError(f"ktls: cannot build a TLS context from {svid.spiffe_id}'s SVID: {err}") from err
        context.keylog_filename = f"/proc/self/fd/{keylog}"
        if server:
            context.num_tickets = 0
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = context.wrap_bio(incoming, outgoing, server_side=server)
        _run(sock, tls, incoming, outgoing)
        if tls.version() != "TLSv1.3":
            raise KtlsError(f"ktls: {peer} negotiated {tls.version()}, not TLS 1.3")
        suite = CipherSuite.named(tls.cipher()[0])  # type: ignore[index]  # set once the handshake is done
        not_after = min(svid.not_after, _verify_peer(tls, bundles, peer, at))
        _flush(sock, outgoing)  # the client's certificate and Finished, once the server is accepted
        if incoming.pending or tls.pending():
            raise KtlsError("ktls: bytes past the handshake were read into user space")
        secrets = _traffic_secrets(keylog)
    finally:
        os.close(keylog)
    client = traffic_keys(suite, secrets["CLIENT_TRAFFIC_SECRET_0"])
    server_keys = traffic_keys(suite, secrets["SERVER_TRAFFIC_SECRET_0"])
    tx, rx = (server_keys, client) if server else (client, server_keys)
    return Session(suite, tx, rx, peer, not_after)


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


def _verify_peer(tls: ssl.SSLObject, bundles: BundleSet, peer: SpiffeId, at: datetime) -> datetime:
    """Verify the peer's chain as SPIFFE says; return its leaf's expiry."""
    try:
        chain = peer_chain(tls)
        verify_chain(chain, bundles, at=at, authorize=authorize_id(peer))
    except (SvidError, AttestError) as err:
        raise KtlsError(f"ktls: peer refused, expected {peer}: {err}") from err
    return chain[0].not_valid_after_utc


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
