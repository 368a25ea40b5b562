"""dev-spire's server Bundle API subset: BatchDeleteFederatedBundle (``spire-server bundle delete``).

Served on the server's local socket next to the Entry API. One result per trust domain, in order, with
SPIRE's per-item codes: the server's own trust domain is INVALID_ARGUMENT, an unknown one NOT_FOUND, and
in RESTRICT mode (the default) a trust domain that registration entries federate with is
FAILED_PRECONDITION. dev-spire serves RESTRICT only; the other modes are refused per item. A deleted
trust domain leaves every agent's bundle set, but, as in SPIRE, not the set an open bundle stream sends.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import grpc
import structlog
from grpclib.const import Cardinality, Handler, Status
from grpclib.exceptions import GRPCError
from grpclib.server import Stream

from authd.errors import SpiffeIdError
from authd.identity import TrustDomain
from authd.spire._proto import bundle_pb2, types_pb2
from authd.spire.dev.registry import EntryRegistry
from authd.spire.endpoint import Endpoint
from authd.spire.entries import status_code

log = structlog.get_logger(__name__)

_SERVICE = "/spire.api.server.bundle.v1.Bundle"
_Request = bundle_pb2.BatchDeleteFederatedBundleRequest
_Response = bundle_pb2.BatchDeleteFederatedBundleResponse
DeleteStream = Stream[_Request, _Response]


class BundleService:
    """The Bundle API over dev-spire's federated trust domains, as grpclib handlers."""

    def __init__(
        self,
        own: TrustDomain,
        federated: Callable[[], set[TrustDomain]],
        remove: Callable[[TrustDomain], None],
        registry: EntryRegistry,
    ) -> None:
        """``federated`` lists the federated trust domains; ``remove`` deletes one."""
        self._own, self._federated, self._remove, self._registry = own, federated, remove, registry

    def __mapping__(self) -> dict[str, Handler]:
        """The method table grpclib dispatches on."""
        return {
            f"{_SERVICE}/BatchDeleteFederatedBundle": Handler(
                self.batch_delete_federated_bundle, Cardinality.UNARY_UNARY, _Request, _Response
            ),
        }

    async def batch_delete_federated_bundle(self, stream: DeleteStream) -> None:
        """Delete each federated bundle; one result per trust domain, in order."""
        request = await stream.recv_message()
        if request is None:
            raise GRPCError(Status.INVALID_ARGUMENT, "missing request")
        results = []
        for name in request.trust_domains:
            code, message = self._delete(name, request.mode)
            results.append(
                _Response.Result(
                    status=types_pb2.Status(code=code.value[0], message=message), trust_domain=name
                )
            )
        await stream.send_message(_Response(results=results))

    def _delete(self, name: str, mode: int) -> tuple[grpc.StatusCode, str]:
        try:
            trust_domain = TrustDomain.parse(name)
        except SpiffeIdError as err:
            return grpc.StatusCode.INVALID_ARGUMENT, f"failed to parse trust domain: {err}"
        if trust_domain == self._own:
            return (
                grpc.StatusCode.INVALID_ARGUMENT,
                "removing the bundle for the server trust domain is not allowed",
            )
        if trust_domain not in self._federated():
            return grpc.StatusCode.NOT_FOUND, "no such bundle"
        if mode != _Request.RESTRICT:
            return grpc.StatusCode.UNIMPLEMENTED, "dev-spire deletes federated bundles in RESTRICT mode only"
        if any(trust_domain in entry.federates_with for entry in self._registry.all()):
            return (
                grpc.StatusCode.FAILED_PRECONDITION,
                "cannot delete bundle; federated with registration entries",
            )
        self._remove(trust_domain)
        log.info("federated bundle deleted", trust_domain=trust_domain.name)
        return grpc.StatusCode.OK, "OK"


async def delete_federated_bundles(server: Path, names: list[str]) -> list[tuple[grpc.StatusCode, str]]:
    """Call BatchDeleteFederatedBundle (RESTRICT) on the server socket ``server``: a code and message each."""
    async with Endpoint.unix(server).channel() as channel:
        method = channel.unary_unary(
            f"{_SERVICE}/BatchDeleteFederatedBundle",
            request_serializer=_Request.SerializeToString,
            response_deserializer=_Response.FromString,
        )
        response = await method(_Request(trust_domains=names), timeout=10)
    return [(status_code(result.status.code), result.status.message) for result in response.results]
