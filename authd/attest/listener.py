"""The attestation listener: proves to other nodes' authd which identities this node hosts.

For every connection: admission (per-source token bucket, a cap on handshakes in flight), then TLS 1.3
under one deadline that covers everything up to the verdict, so garbage, truncated ClientHellos and idle
connections cost at most ``attest.handshake_timeout``. The SNI picks the local workload whose SVID is
served; the client must present the node SVID of a node in cluster state, verified against its own trust
domain's bundle. Only then does the listener answer the client's nonce with its node proof (see
:mod:`authd.attest.protocol`). Every refusal is counted by reason and logged; none is fatal.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import time
import weakref
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Protocol

import structlog

from authd.attest.limits import SourceRateLimiter
from authd.attest.protocol import NONCE_BYTES, LocalIdentities, node_proof
from authd.attest.tls import ContextCache, peer_chain
from authd.config.model import AttestConfig
from authd.errors import AttestError, SvidError
from authd.identity import SpiffeId, sni_for
from authd.x509svid import X509Svid, verify_chain

log = structlog.get_logger(__name__)

REFUSAL_LOG_INTERVAL = 10.0
"""Seconds between two log lines for refusals of the same reason (every refusal is counted)."""


class NodeDirectory(Protocol):
    """Which SPIFFE IDs are authd node identities in cluster state."""

    def node_named_by(self, spiffe_id: SpiffeId) -> str | None:
        """The name of the node whose authd runs as ``spiffe_id``, or None if it is not a known node."""
        ...


# OpenSSL's reasons for a failed server handshake, mapped to the low-cardinality labels we count.
_TLS_REFUSALS = {
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": "no-client-certificate",
    "CERTIFICATE_VERIFY_FAILED": "untrusted-client-certificate",
    "TLSV1_ALERT_UNKNOWN_CA": "untrusted-client-certificate",
    "UNSUPPORTED_PROTOCOL": "tls-version",
    "NO_PROTOCOLS_AVAILABLE": "tls-version",
    "TLSV1_ALERT_PROTOCOL_VERSION": "tls-version",
    "WRONG_VERSION_NUMBER": "not-tls",
    "HTTP_REQUEST": "not-tls",
    "UNEXPECTED_RECORD": "not-tls",
    "RECORD_LAYER_FAILURE": "not-tls",
    "PACKET_LENGTH_TOO_LONG": "not-tls",
}


class ListenerStats:
    """What the listener did: served attestations and refusals by reason."""

    def __init__(self) -> None:
        """Start at zero."""
        self.served = 0
        self.refused: Counter[str] = Counter()


class Listener:
    """Serves attestations on an already bound listening socket."""

    def __init__(
        self,
        identities: LocalIdentities,
        nodes: NodeDirectory,
        config: AttestConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        """Serve the SVIDs in ``identities`` to clients that are nodes in ``nodes``."""
        self._identities = identities
        self._nodes = nodes
        self._timeout = config.handshake_timeout.total_seconds()
        self._max_in_flight = config.max_concurrent_handshakes
        self._in_flight = 0
        self._limiter = SourceRateLimiter(config.per_source_rate, config.per_source_burst, clock)
        self._clock = clock
        self._logged_at: dict[str, float] = {}
        self._unlogged: Counter[str] = Counter()
        self._now = now
        self._contexts = ContextCache()
        # Per-connection SNI verdicts, set in the SNI callback and read when the handshake fails.
        self._sni: weakref.WeakKeyDictionary[ssl.SSLObject, X509Svid | str] = weakref.WeakKeyDictionary()
        self._by_sni: dict[str, SpiffeId] = {}
        self.stats = ListenerStats()

    async def serve(self, sock: socket.socket) -> None:
        """Accept connections on ``sock`` until cancelled."""
        loop = asyncio.get_running_loop()
        sock.settimeout(0)  # non-blocking, for the event loop
        log.info("attestation listener started", address=sock.getsockname())
        async with asyncio.TaskGroup() as connections:
            while True:
                conn, address = await loop.sock_accept(sock)
                source = str(address[0])
                if self._in_flight >= self._max_in_flight:
                    self._refuse(conn, source, "overloaded")
                elif not self._limiter.admit(source):
                    self._refuse(conn, source, "rate-limited")
                else:
                    self._in_flight += 1
                    connections.create_task(self._handle(conn, source))

    def _refuse(self, conn: socket.socket, source: str, reason: str, detail: str = "") -> None:
        conn.close()
        self.stats.refused[reason] += 1
        # Every refusal is counted; the log gets one line per reason per interval, so that a flood of
        # garbage cannot flood the journal too.
        now = self._clock()
        if now - self._logged_at.get(reason, -REFUSAL_LOG_INTERVAL) < REFUSAL_LOG_INTERVAL:
            self._unlogged[reason] += 1
            return
        self._logged_at[reason] = now
        log.info(
            "attestation refused",
            source=source,
            reason=reason,
            detail=detail or None,
            unlogged_since=self._unlogged.pop(reason, 0),
        )

    async def _handle(self, conn: socket.socket, source: str) -> None:
        try:
            async with asyncio.timeout(self._timeout):
                await self._serve_one(conn, source)
        except TimeoutError:
            self._refuse(conn, source, "deadline")
        except AttestError as err:
            self._refuse(conn, source, err.reason, str(err))
        except ssl.SSLError as err:
            self._refuse(conn, source, _TLS_REFUSALS.get(err.reason or "", "tls-error"), str(err))
        except (ConnectionError, OSError) as err:
            self._refuse(conn, source, "connection-error", str(err))
        finally:
            self._in_flight -= 1
            conn.close()

    async def _serve_one(self, conn: socket.socket, source: str) -> None:
        identities = self._identities
        own = identities.own_svid()
        if own is None:
            raise AttestError("not-ready", "this node holds no SVID yet")
        bundles = identities.bundles()
        context = self._contexts.get(own, bundles, server=True)
        context.sni_callback = self._choose_identity
        tls = _TlsOverSocket(conn, context)
        try:
            await tls.handshake()
        except ssl.SSLError as err:
            verdict = self._sni.get(tls.ssl_object)
            if isinstance(verdict, str):
                raise AttestError(
                    verdict, "client asked for no identity or one this node does not host"
                ) from err
            raise
        served = self._sni.get(tls.ssl_object)
        if not isinstance(served, X509Svid):
            raise AttestError("missing-sni", "handshake completed without an identity chosen by SNI")
        try:
            client = verify_chain(
                peer_chain(tls.ssl_object), bundles, at=self._now(), authorize=self._authorize_node
            )
        except SvidError as err:
            raise AttestError(err.rule, str(err)) from err
        nonce = await tls.receive_exactly(NONCE_BYTES)
        # Signed for the leaf this session presented: the SVID chosen in the SNI callback, even if it
        # rotated since.
        await tls.send(node_proof(own, nonce, served.leaf))
        self._limiter.refund(source)  # a verified node's attestation: only refusals count against the rate
        self.stats.served += 1
        log.debug("attestation served", source=source, identity=str(served.spiffe_id), client=str(client))

    def _choose_identity(
        self, ssl_object: ssl.SSLObject, server_name: str | None, context: ssl.SSLContext
    ) -> int | None:
        """SNI callback: switch to the context presenting the workload named by the SNI, or abort."""
        del context
        if server_name is None:
            self._sni[ssl_object] = "missing-sni"
            return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
        identities = self._identities
        svid = self._hosted(server_name)
        if svid is None:
            self._sni[ssl_object] = "unknown-sni"
            return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
        try:
            ssl_object.context = self._contexts.get(svid, identities.bundles(), server=True)
        except AttestError:
            self._sni[ssl_object] = "no-bundles"
            return ssl.ALERT_DESCRIPTION_INTERNAL_ERROR
        self._sni[ssl_object] = svid
        return None

    def _hosted(self, server_name: str) -> X509Svid | None:
        """The SVID of the local identity whose SNI is ``server_name``, if this node holds one.

        The SNI -> ID index is rebuilt only when a name is not in it (or names an SVID no longer held), so
        a served attestation costs O(1) whatever the number of local identities; only names the node
        does not know cost a pass over its identities, and those connections are rate-limited.
        """
        identities = self._identities
        spiffe_id = self._by_sni.get(server_name)
        svid = identities.svid_for(spiffe_id) if spiffe_id is not None else None
        if svid is None:
            self._by_sni = {sni_for(spiffe_id): spiffe_id for spiffe_id in identities.local_svids()}
            spiffe_id = self._by_sni.get(server_name)
            svid = identities.svid_for(spiffe_id) if spiffe_id is not None else None
        return svid

    def _authorize_node(self, spiffe_id: SpiffeId) -> None:
        if self._nodes.node_named_by(spiffe_id) is None:
            raise SvidError("unknown-node", f'"{spiffe_id}" is not the identity of a node in cluster state')


class _TlsOverSocket:
    """Server-side TLS driven by hand over a non-blocking socket, so the SSLObject stays ours.

    asyncio's TLS transport hides the SSLObject until the handshake succeeds; the listener needs it when
    the handshake fails too, to tell an unknown SNI (decided in the SNI callback) from other failures.
    """

    def __init__(self, conn: socket.socket, context: ssl.SSLContext) -> None:
        self._conn = conn
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self.ssl_object = context.wrap_bio(self._incoming, self._outgoing, server_side=True)

    async def handshake(self) -> None:
        while True:
            try:
                self.ssl_object.do_handshake()
            except ssl.SSLWantReadError:
                await self._flush()
                await self._receive()
            except ssl.SSLError:
                await self._flush()  # deliver the alert, so the client learns why
                raise
            else:
                await self._flush()
                return

    async def receive_exactly(self, size: int) -> bytes:
        """Read ``size`` bytes of application data."""
        data = b""
        while len(data) < size:
            try:
                chunk = self.ssl_object.read(size - len(data))
            except ssl.SSLWantReadError:
                await self._flush()  # TLS 1.3 session tickets or key updates may be waiting to go out
                await self._receive()
                continue
            if not chunk:
                raise ConnectionResetError("peer closed the connection before sending its nonce")
            data += chunk
        return data

    async def send(self, data: bytes) -> None:
        self.ssl_object.write(data)
        with contextlib.suppress(ssl.SSLError):
            self.ssl_object.unwrap()  # close_notify; the peer's reply is not awaited
        await self._flush()

    async def _receive(self) -> None:
        data = await asyncio.get_running_loop().sock_recv(self._conn, 16384)
        if not data:
            raise ConnectionResetError("peer closed the connection")
        self._incoming.write(data)

    async def _flush(self) -> None:
        pending = self._outgoing.read()
        if pending:
            await asyncio.get_running_loop().sock_sendall(self._conn, pending)


def bind(address: str, port: int) -> socket.socket:
    """Bind and listen on ``address:port`` for the listener (the composition root owns the socket)."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((address, port))
        sock.listen(1024)
    except OSError as err:
        with contextlib.suppress(OSError):
            sock.close()
        # EADDRNOTAVAIL (attest.listen_address is not this host's), EADDRINUSE: one line, not a traceback.
        raise AttestError("listen", f"cannot listen on {address}:{port}: {err.strerror}") from err
    return sock
