"""dev-spire's Delegated Identity API (admin socket), behaving like SPIRE's agent.

The caller is attested by its peer credentials; its identities must include an authorized delegate:

* none at all: ``PERMISSION_DENIED "no identity issued"``;
* none authorized: ``PERMISSION_DENIED "caller not configured as an authorized delegate"``;
  re-checked on every update, as SPIRE does.

``SubscribeToX509SVIDs`` then needs exactly one of selectors and a non-zero pid
(``INVALID_ARGUMENT "must provide either selectors or non-zero PID, but not both"``); selectors SPIRE
could not parse give ``INVALID_ARGUMENT "could not parse provided selectors"``. Selectors matching
nothing give an empty list, not an error. Admin and downstream entries are left out. No security
header is needed (SPIRE applies it to the Workload API only).

``SubscribeToX509Bundles`` accumulates as SPIRE's does: a trust domain, once sent on a stream, stays in
every later message of that stream (with its last bundle) even after the agent dropped it; only a new
stream starts from the agent's current set. A client learns of removals only by reopening.
"""

from __future__ import annotations

import structlog
from cryptography.hazmat.primitives import serialization
from grpclib.const import Cardinality, Handler, Status
from grpclib.exceptions import GRPCError
from grpclib.server import Stream

from authd.identity import Selector
from authd.spire._proto import delegatedidentity_pb2, types_pb2
from authd.spire.dev.agent import DevAgent
from authd.spire.dev.attestor import AttestationError, Caller, attest_pid
from authd.spire.dev.calls import attest_caller
from authd.spire.dev.registry import selector_problem
from authd.spire.dev.workload_api import key_der
from authd.spire.entries import spiffe_id_to_proto
from authd.x509svid import X509Svid

log = structlog.get_logger(__name__)

_SERVICE = "/spire.api.agent.delegatedidentity.v1.DelegatedIdentity"

SvidsStream = Stream[
    delegatedidentity_pb2.SubscribeToX509SVIDsRequest, delegatedidentity_pb2.SubscribeToX509SVIDsResponse
]
BundlesStream = Stream[
    delegatedidentity_pb2.SubscribeToX509BundlesRequest, delegatedidentity_pb2.SubscribeToX509BundlesResponse
]


class DelegatedIdentityService:
    """The Delegated Identity API of one agent, as grpclib handlers."""

    def __init__(self, agent: DevAgent) -> None:
        """Serve ``agent``'s identities to its authorized delegates."""
        self._agent = agent

    def __mapping__(self) -> dict[str, Handler]:
        """The method table grpclib dispatches on."""
        return {
            f"{_SERVICE}/SubscribeToX509SVIDs": Handler(
                self.subscribe_x509_svids,
                Cardinality.UNARY_STREAM,
                delegatedidentity_pb2.SubscribeToX509SVIDsRequest,
                delegatedidentity_pb2.SubscribeToX509SVIDsResponse,
            ),
            f"{_SERVICE}/SubscribeToX509Bundles": Handler(
                self.subscribe_x509_bundles,
                Cardinality.UNARY_STREAM,
                delegatedidentity_pb2.SubscribeToX509BundlesRequest,
                delegatedidentity_pb2.SubscribeToX509BundlesResponse,
            ),
        }

    def _authorize(self, caller: Caller) -> None:
        identities = self._agent.identities(caller.selectors)
        if not identities:
            raise GRPCError(Status.PERMISSION_DENIED, "no identity issued")
        if not any(issued.entry.spiffe_id in self._agent.authorized_delegates for issued in identities):
            raise GRPCError(Status.PERMISSION_DENIED, "caller not configured as an authorized delegate")

    async def subscribe_x509_svids(self, stream: SvidsStream) -> None:
        """Stream the SVIDs of the workload the request describes, to an authorized delegate."""
        request = await stream.recv_message()
        caller = attest_caller(stream)
        self._authorize(caller)
        if request is None:
            raise GRPCError(Status.INVALID_ARGUMENT, "missing request")
        selectors = _requested_selectors(request)
        log.info(
            "delegated SVID subscription",
            node=self._agent.node,
            delegate_pid=caller.pid,
            selectors=sorted(str(s) for s in selectors),
        )
        feed = self._agent.feed
        last: delegatedidentity_pb2.SubscribeToX509SVIDsResponse | None = None
        while True:
            version = feed.version
            self._authorize(caller)
            identities = [
                issued
                for issued in self._agent.identities(selectors)
                if not issued.entry.admin and not issued.entry.downstream
            ]
            response = delegatedidentity_pb2.SubscribeToX509SVIDsResponse(
                x509_svids=[
                    delegatedidentity_pb2.X509SVIDWithKey(
                        x509_svid=types_pb2.X509SVID(
                            cert_chain=_cert_ders(issued.svid),
                            id=spiffe_id_to_proto(issued.entry.spiffe_id),
                            expires_at=int(issued.svid.not_after.timestamp()),
                            hint=issued.entry.hint,
                        ),
                        x509_svid_key=key_der(issued.svid),
                    )
                    for issued in identities
                ],
                federates_with=sorted(td.id_string() for td in self._agent.federated_bundles(identities)),
            )
            if response != last:
                await stream.send_message(response)
                last = response
            await feed.wait_beyond(version)

    async def subscribe_x509_bundles(self, stream: BundlesStream) -> None:
        """Stream every bundle the agent holds, keyed ``spiffe://<td>``, to an authorized delegate.

        Trust domains accumulate for the life of the stream, as in SPIRE: one the agent drops is still sent.
        """
        await stream.recv_message()
        caller = attest_caller(stream)
        feed = self._agent.feed
        last: delegatedidentity_pb2.SubscribeToX509BundlesResponse | None = None
        sent: dict[str, bytes] = {}
        while True:
            version = feed.version
            self._authorize(caller)
            sent.update({td.id_string(): b.der() for td, b in self._agent.bundles().items()})
            response = delegatedidentity_pb2.SubscribeToX509BundlesResponse(ca_certificates=sent)
            if response != last:
                await stream.send_message(response)
                last = response
            await feed.wait_beyond(version)


def _requested_selectors(request: delegatedidentity_pb2.SubscribeToX509SVIDsRequest) -> frozenset[Selector]:
    if bool(request.selectors) == bool(request.pid):
        raise GRPCError(
            Status.INVALID_ARGUMENT, "must provide either selectors or non-zero PID, but not both"
        )
    if request.pid:
        try:
            return attest_pid(request.pid).selectors
        except AttestationError as err:
            raise GRPCError(Status.UNAVAILABLE, "workload attestation failed") from err
    selectors = frozenset(Selector(s.type, s.value) for s in request.selectors)
    if any(selector_problem(selector) for selector in selectors):
        raise GRPCError(Status.INVALID_ARGUMENT, "could not parse provided selectors")
    return selectors


def _cert_ders(svid: X509Svid) -> list[bytes]:
    return [cert.public_bytes(serialization.Encoding.DER) for cert in svid.chain]
