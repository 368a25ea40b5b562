"""dev-spire's Workload API (``/SpiffeWorkloadAPI/...``), behaving like SPIRE's agent.

* Every call needs the ``workload.spiffe.io: true`` header, else ``INVALID_ARGUMENT "security header
  missing from request"``.
* FetchX509SVID streams the caller's identities (entries of this agent whose selectors the caller has),
  sorted by entry ID, each with the local bundle, plus the bundles of trust domains those entries
  federate with, keyed ``spiffe://<td>``; a new message on every change. No identity, at the start or
  later: ``PERMISSION_DENIED "no identity issued"``, and the stream ends.
* FetchX509Bundles: the same bundles, de-duplicated; ``PERMISSION_DENIED`` without an identity.
* JWT and WIT methods: ``UNIMPLEMENTED``.
"""

from __future__ import annotations

from typing import Any

import structlog
from cryptography.hazmat.primitives import serialization
from grpclib.const import Cardinality, Handler, Status
from grpclib.exceptions import GRPCError
from grpclib.server import Stream

from authd.spire._proto import workload_pb2
from authd.spire.dev.agent import DevAgent, Issued
from authd.spire.dev.calls import attest_caller, require_security_header
from authd.x509svid import X509Svid

log = structlog.get_logger(__name__)

_SERVICE = "/SpiffeWorkloadAPI"


def chain_der(svid: X509Svid) -> bytes:
    """The SVID's certificates, leaf first, as concatenated DER."""
    return b"".join(cert.public_bytes(serialization.Encoding.DER) for cert in svid.chain)


def key_der(svid: X509Svid) -> bytes:
    """The SVID's private key as unencrypted PKCS#8 DER."""
    return svid.private_key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def x509_svid_response(agent: DevAgent, identities: list[Issued]) -> workload_pb2.X509SVIDResponse:
    """What FetchX509SVID sends for these identities."""
    local = agent.bundle(agent.trust_domain)
    local_der = local.der() if local is not None else b""
    return workload_pb2.X509SVIDResponse(
        svids=[
            workload_pb2.X509SVID(
                spiffe_id=str(issued.entry.spiffe_id),
                x509_svid=chain_der(issued.svid),
                x509_svid_key=key_der(issued.svid),
                bundle=local_der,
                hint=issued.entry.hint,
            )
            for issued in identities
        ],
        federated_bundles={td.id_string(): b.der() for td, b in agent.federated_bundles(identities).items()},
    )


class WorkloadApiService:
    """The Workload API of one agent, as grpclib handlers."""

    def __init__(self, agent: DevAgent) -> None:
        """Serve ``agent``'s identities."""
        self._agent = agent

    def __mapping__(self) -> dict[str, Handler]:
        """The method table grpclib dispatches on (what its code generator would write)."""
        return {
            f"{_SERVICE}/FetchX509SVID": Handler(
                self.fetch_x509_svid,
                Cardinality.UNARY_STREAM,
                workload_pb2.X509SVIDRequest,
                workload_pb2.X509SVIDResponse,
            ),
            f"{_SERVICE}/FetchX509Bundles": Handler(
                self.fetch_x509_bundles,
                Cardinality.UNARY_STREAM,
                workload_pb2.X509BundlesRequest,
                workload_pb2.X509BundlesResponse,
            ),
            f"{_SERVICE}/FetchJWTSVID": Handler(
                self._unimplemented("fetching JWT-SVIDs is not implemented"),
                Cardinality.UNARY_UNARY,
                workload_pb2.JWTSVIDRequest,
                workload_pb2.JWTSVIDResponse,
            ),
            f"{_SERVICE}/FetchJWTBundles": Handler(
                self._unimplemented("fetching JWT bundles is not implemented"),
                Cardinality.UNARY_STREAM,
                workload_pb2.JWTBundlesRequest,
                workload_pb2.JWTBundlesResponse,
            ),
            f"{_SERVICE}/FetchWITSVID": Handler(
                self._unimplemented("fetching WIT-SVIDs is not implemented"),
                Cardinality.UNARY_STREAM,
                workload_pb2.WITSVIDRequest,
                workload_pb2.WITSVIDResponse,
            ),
            f"{_SERVICE}/FetchWITBundles": Handler(
                self._unimplemented("fetching WIT bundles is not implemented"),
                Cardinality.UNARY_STREAM,
                workload_pb2.WITBundlesRequest,
                workload_pb2.WITBundlesResponse,
            ),
        }

    async def fetch_x509_svid(
        self, stream: Stream[workload_pb2.X509SVIDRequest, workload_pb2.X509SVIDResponse]
    ) -> None:
        """Stream the caller's SVIDs until it leaves or loses its last identity."""
        require_security_header(stream)
        await stream.recv_message()
        caller = attest_caller(stream)
        feed = self._agent.feed
        log.info("workload API stream opened", node=self._agent.node, pid=caller.pid, uid=caller.uid)
        last: workload_pb2.X509SVIDResponse | None = None
        while True:
            version = feed.version
            identities = self._agent.identities(caller.selectors)
            if not identities:
                log.info("no identity issued", node=self._agent.node, pid=caller.pid, uid=caller.uid)
                raise GRPCError(Status.PERMISSION_DENIED, "no identity issued")
            response = x509_svid_response(self._agent, identities)
            if response != last:
                await stream.send_message(response)
                last = response
            await feed.wait_beyond(version)

    async def fetch_x509_bundles(
        self, stream: Stream[workload_pb2.X509BundlesRequest, workload_pb2.X509BundlesResponse]
    ) -> None:
        """Stream the bundles the caller may use, de-duplicated."""
        require_security_header(stream)
        await stream.recv_message()
        caller = attest_caller(stream)
        feed = self._agent.feed
        last: workload_pb2.X509BundlesResponse | None = None
        while True:
            version = feed.version
            identities = self._agent.identities(caller.selectors)
            if not identities:
                raise GRPCError(Status.PERMISSION_DENIED, "no identity issued")
            bundles = dict(self._agent.federated_bundles(identities))
            local = self._agent.bundle(self._agent.trust_domain)
            if local is not None:
                bundles[local.trust_domain] = local
            response = workload_pb2.X509BundlesResponse(
                bundles={td.id_string(): b.der() for td, b in bundles.items()}
            )
            if response != last:
                await stream.send_message(response)
                last = response
            await feed.wait_beyond(version)

    @staticmethod
    def _unimplemented(message: str) -> Any:  # noqa: ANN401 - one factory for handlers of several types
        async def handler(stream: Stream[Any, Any]) -> None:
            require_security_header(stream)
            raise GRPCError(Status.UNIMPLEMENTED, message)

        return handler
