"""The attestation client: "is identity R really at node A?", answered by a TLS 1.3 handshake.

authd dials A's addresses in the order cluster state lists them (the same choice on every attempt;
the next address only when the previous one cannot be reached), asks for R by SNI, presents its own
node SVID, verifies the presented chain against the bundle of R's trust domain and the exact SPIFFE ID R,
then sends a nonce and checks the listener's node proof: signed for this session by the node SVID that
cluster state gives A (:mod:`authd.attest.protocol`). The result, "R at A until T", is an
:class:`Attestation`.

Failures are :class:`~authd.errors.AttestError` with a reason; :data:`TRANSIENT` reasons say "could not
ask" (the last good result stays until it expires), the others are answers: A does not host R, or what
it presented is not R.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import ssl
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import structlog
from cryptography import x509

from authd.attest.protocol import (
    MAX_PROOF_BYTES,
    NONCE_BYTES,
    LocalIdentities,
    check_signature,
    parse_node_proof,
    signed_message,
)
from authd.attest.tls import ContextCache, peer_chain
from authd.config.model import AttestConfig
from authd.errors import AttestError, SvidError
from authd.histogram import Histogram
from authd.identity import SpiffeId, sni_for
from authd.x509svid import BundleSet, authorize_id, verify_chain

log = structlog.get_logger(__name__)

TRANSIENT = frozenset(
    {
        "unreachable",
        "timeout",
        "connection-error",
        "not-ready",
        "no-bundles",
        "local-tls",
        "node-expired",
        "own-certificate-expired",
    }
)
"""Reasons that say nothing about whether the node hosts the identity.

An expired *node* SVID, the peer's (``node-expired``) or this node's (the listener's alert,
``own-certificate-expired``), is what a SPIRE outage looks like: the node cannot renew it. It says
nothing about R, so the last result stays until R's own expiry. Taken as an answer, it revoked the
result, and the auth entry with it, up to a second before the expiry the map showed (node SVIDs are
issued moments before the workloads' ones, so they expire first).
"""

_TLS_ANSWERS = {
    "TLSV1_UNRECOGNIZED_NAME": "not-hosted",
    "CERTIFICATE_VERIFY_FAILED": "untrusted-server-certificate",
    "TLSV1_ALERT_UNKNOWN_CA": "refused-by-peer",
    "TLSV1_ALERT_BAD_CERTIFICATE": "refused-by-peer",
    "TLSV1_ALERT_CERTIFICATE_REQUIRED": "refused-by-peer",
    "TLSV1_ALERT_INTERNAL_ERROR": "refused-by-peer",
    "TLSV1_ALERT_PROTOCOL_VERSION": "tls-version",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "own-certificate-expired",
}


@dataclass(frozen=True, slots=True)
class Target:
    """What to attest: ``remote_id`` at ``node``, reachable at ``addresses`` (in order) on ``port``.

    ``node_id`` is the SPIFFE ID cluster state gives the node's authd: the node proof must carry it.
    """

    remote_id: SpiffeId
    node: str
    node_id: SpiffeId
    addresses: tuple[str, ...]
    port: int


@dataclass(frozen=True, slots=True)
class Attestation:
    """Identity ``remote_id`` proved itself at ``node`` (through ``address``); valid until ``not_after``."""

    remote_id: SpiffeId
    node: str
    address: str
    chain: tuple[x509.Certificate, ...]
    verified_at: datetime

    @property
    def not_after(self) -> datetime:
        """When the remote leaf expires."""
        return self.chain[0].not_valid_after_utc

    @property
    def not_before(self) -> datetime:
        """When the remote leaf became valid."""
        return self.chain[0].not_valid_before_utc

    @property
    def serial(self) -> int:
        """The remote leaf's serial number: a new one means the remote SVID rotated."""
        return self.chain[0].serial_number

    def reverify(self, bundles: BundleSet, at: datetime) -> None:
        """Check the remembered chain against new bundles (after a bundle change); raise SvidError."""
        verify_chain(self.chain, bundles, at=at, authorize=authorize_id(self.remote_id))


class ClientStats:
    """Attestation attempts by result ("ok" or the failure reason) and the latency of successes.

    ``latency`` is cumulative (for the metrics histogram); ``latencies`` keeps the most recent values in
    seconds (for benchmarks' medians).
    """

    def __init__(self) -> None:
        """Start at zero."""
        self.results: Counter[str] = Counter()
        self.latency = Histogram()
        self.latencies: list[float] = []

    def record_latency(self, seconds: float) -> None:
        """Count a latency in the histogram and remember it among the most recent 4096."""
        self.latency.observe(seconds)
        self.latencies.append(seconds)
        if len(self.latencies) > 4096:
            del self.latencies[:1024]


class Attestor:
    """Runs attestations against other nodes' listeners, a bounded number at a time."""

    def __init__(
        self,
        identities: LocalIdentities,
        config: AttestConfig,
        *,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Present ``identities.own_svid()``; trust ``identities.bundles()``."""
        self._identities = identities
        self._timeout = config.client_timeout.total_seconds()
        self._slots = asyncio.Semaphore(config.client_concurrency)
        self._contexts = ContextCache()
        self._now = now
        self._clock = clock
        self.stats = ClientStats()

    async def attest(self, target: Target) -> Attestation:
        """Prove that ``target.remote_id`` is at ``target.node``; raise AttestError otherwise."""
        async with self._slots:
            started = self._clock()
            try:
                attestation = await self._attest(target)
            except AttestError as err:
                self.stats.results[err.reason] += 1
                raise
            self.stats.results["ok"] += 1
            self.stats.record_latency(self._clock() - started)
            return attestation

    async def _attest(self, target: Target) -> Attestation:
        own = self._identities.own_svid()
        if own is None:
            raise AttestError("not-ready", "this node holds no SVID yet")
        bundles = self._identities.bundles()
        context = self._contexts.get(own, bundles, server=False)
        unreachable: list[str] = []
        for address in target.addresses:
            try:
                return await self._attempt(context, bundles, target, address)
            except AttestError as err:
                if err.reason != "unreachable":
                    raise
                unreachable.append(str(err))
        raise AttestError(
            "unreachable", f"no address of node {target.node} answered: {'; '.join(unreachable)}"
        )

    async def _attempt(
        self,
        context: ssl.SSLContext,
        bundles: BundleSet,
        target: Target,
        address: str,
    ) -> Attestation:
        remote_id, port = target.remote_id, target.port
        writer: asyncio.StreamWriter | None = None
        try:
            async with asyncio.timeout(self._timeout):
                # TCP first, then TLS: an address that cannot be connected to (refused, no route, or no
                # answer before the deadline) is "unreachable" and the next one is tried; once connected,
                # whatever happens is the node's answer.
                try:
                    reader, writer = await asyncio.open_connection(address, port)
                except OSError as err:
                    raise AttestError("unreachable", f"{address}:{port}: {err}") from err
                try:
                    await writer.start_tls(
                        context, server_hostname=sni_for(remote_id), ssl_handshake_timeout=self._timeout
                    )
                except ssl.SSLError as err:
                    reason = _TLS_ANSWERS.get(err.reason or "", "tls-error")
                    raise AttestError(reason, f"{address}: handshake failed: {err}") from err
                except OSError as err:  # closed at once: the listener's limits, or it is stopping
                    raise AttestError(
                        "connection-error", f"{address}:{port}: closed during the handshake: {err}"
                    ) from err
                chain = peer_chain(writer.get_extra_info("ssl_object"))
                try:
                    verify_chain(chain, bundles, at=self._now(), authorize=authorize_id(remote_id))
                except SvidError as err:
                    raise AttestError(err.rule, f"{address}: {err}") from err
                await self._check_node(reader, writer, chain[0], bundles, target, address)
        except TimeoutError as err:
            if writer is None:
                raise AttestError(
                    "unreachable", f"{address}:{port}: no connection within {self._timeout}s"
                ) from err
            raise AttestError("timeout", f"{address}:{port}: no verdict within {self._timeout}s") from err
        finally:
            if writer is not None:
                writer.close()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(writer.wait_closed(), 1)
        log.debug("attested", identity=str(remote_id), node=target.node, address=address)
        return Attestation(remote_id, target.node, address, chain, self._now())

    async def _check_node(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        served_leaf: x509.Certificate,
        bundles: BundleSet,
        target: Target,
        address: str,
    ) -> None:
        """Ask for the node proof and check it names node ``target.node`` and this session's leaf."""
        nonce = secrets.token_bytes(NONCE_BYTES)
        writer.write(nonce)
        try:
            await writer.drain()
            size = int.from_bytes(await reader.readexactly(4), "big")
            if size > MAX_PROOF_BYTES:
                raise AttestError("bad-node-proof", f"{address}: node proof of {size} bytes")
            body = await reader.readexactly(size)
        except (ConnectionError, ssl.SSLError, asyncio.IncompleteReadError) as err:
            # No proof: the listener refused this node's identity (or is not an authd listener). In TLS
            # 1.3 its verdict on the client certificate arrives here, after the client's handshake.
            reason = "refused-by-peer"
            if isinstance(err, ssl.SSLError):
                reason = _TLS_ANSWERS.get(err.reason or "", reason)
            raise AttestError(reason, f"{address}: closed without a node proof: {err}") from err
        node_chain, signature = parse_node_proof(body)
        try:
            verify_chain(node_chain, bundles, at=self._now(), authorize=authorize_id(target.node_id))
        except SvidError as err:
            raise AttestError(f"node-{err.rule}", f"{address}: not node {target.node}: {err}") from err
        check_signature(node_chain[0], signature, signed_message(nonce, served_leaf))
