"""Workload API client: authd's own X509-SVID and the bundles that come with it.

Speaks ``/SpiffeWorkloadAPI/FetchX509SVID`` with the ``workload.spiffe.io: true`` header on every call,
over the socket from config or ``SPIFFE_ENDPOINT_SOCKET``. Each response is the complete current state;
it is parsed strictly (:func:`parse_x509_svid_response`) and either applied as a whole or rejected as a
whole, keeping the last good state. authd's own SVID is the one with the exact node ID
(:class:`NodeIdentity`: ``node.spiffe_id``, else ``spiffe://<td>/authd/<node name>``), never merely the
first or default one: an agent that also issues other SVIDs to authd's uid (several entries match it) must
not make one of those the node identity. The node SVID must chain to its trust domain's bundle.

If the agent's first response carries no SVID with the node ID, authd refuses to start (a non-retryable
SpireError fails the critical job, with a message naming the IDs it was issued instead). Once held, a
response without it redacts the node SVID, as a ``PERMISSION_DENIED`` does.

A ``PERMISSION_DENIED`` after SVIDs were held means the agent withdrew them: they are redacted from the
store at once (Workload API 5.2.1), and the stream is retried with backoff like any other failure.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

import grpc

from authd.backoff import BackoffFactory
from authd.errors import SpiffeIdError, SpireError, SvidError
from authd.identity import SpiffeId, TrustDomain, node_id
from authd.spire._proto import workload_pb2
from authd.spire.bundles import add_bundle, parse_bundle, parse_bundle_map
from authd.spire.endpoint import Endpoint
from authd.spire.stream import Sleep, StreamFailure, StreamStatus, classify, follow, stream_ended
from authd.svids import BundleOrigin, Clock, SvidStore
from authd.x509svid import BundleSet, X509Bundle, X509Svid, authorize_id, parse_svid, split_der, verify_chain

FETCH_X509_SVID = "/SpiffeWorkloadAPI/FetchX509SVID"
FETCH_X509_BUNDLES = "/SpiffeWorkloadAPI/FetchX509Bundles"

SECURITY_HEADER = (("workload.spiffe.io", "true"),)

SOURCE = "workload-api"


@dataclass(frozen=True, slots=True)
class NodeIdentity:
    """Which SPIFFE ID is authd's own: the configured one, else ``spiffe://<td>/authd/<node name>``."""

    node_name: str
    configured: SpiffeId | None = None

    def expected(self, trust_domain: TrustDomain) -> SpiffeId:
        """The node ID, in the agent's ``trust_domain`` unless configured outright."""
        return self.configured or node_id(trust_domain, self.node_name)


@dataclass(frozen=True, slots=True)
class X509Context:
    """One Workload API response: every SVID (default first), authd's node SVID, and every bundle."""

    svids: tuple[X509Svid, ...]
    node_svid: X509Svid
    bundles: Mapping[TrustDomain, X509Bundle]


def parse_x509_svid_response(
    message: workload_pb2.X509SVIDResponse, *, at: datetime, node: NodeIdentity
) -> X509Context:
    """Parse and check a FetchX509SVID response; raise SvidError naming the first problem found.

    Every SVID must parse and match its key and its ``spiffe_id`` field; every bundle must parse and be
    non-empty; one SVID must have the exact node ID (rule ``node-id-missing`` otherwise), and it must
    verify against its own trust domain's bundle at ``at``.
    """
    if not message.svids:
        raise SvidError("empty-svids", "response carries no SVIDs")
    svids: list[X509Svid] = []
    bundles: dict[TrustDomain, X509Bundle] = {}
    for index, item in enumerate(message.svids):
        try:
            claimed = SpiffeId.parse(item.spiffe_id)
        except SpiffeIdError as err:
            raise SvidError("spiffe-id", f"svids[{index}].spiffe_id {item.spiffe_id!r}: {err}") from err
        svid = parse_svid(split_der(item.x509_svid), item.x509_svid_key, hint=item.hint)
        if svid.spiffe_id != claimed:
            raise SvidError(
                "spiffe-id-mismatch",
                f"svids[{index}] claims {claimed} but its certificate is {svid.spiffe_id}",
            )
        add_bundle(bundles, parse_bundle(claimed.trust_domain, item.bundle))
        svids.append(svid)
    parse_bundle_map(message.federated_bundles, into=bundles)
    expected = node.expected(svids[0].spiffe_id.trust_domain)
    own = next((svid for svid in svids if svid.spiffe_id == expected), None)
    if own is None:
        issued = ", ".join(str(svid.spiffe_id) for svid in svids)
        raise SvidError("node-id-missing", f"no SVID for the node ID {expected} (issued: {issued})")
    verify_chain(own.chain, BundleSet(bundles), at=at, authorize=authorize_id(expected))
    return X509Context(tuple(svids), own, bundles)


class WorkloadApiClient:
    """Follows FetchX509SVID and keeps authd's own SVID and bundles in the store."""

    def __init__(
        self,
        endpoint: Endpoint,
        store: SvidStore,
        *,
        node: NodeIdentity,
        backoff: BackoffFactory,
        status: StreamStatus,
        clock: Clock | None = None,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        """Nothing connects until :meth:`run`."""
        self._endpoint = endpoint
        self._store = store
        self._node = node
        self._held = False  # whether a node SVID was ever held: before that, a missing one is fatal
        self._backoff = backoff
        self._status = status
        self._clock = clock or (lambda: datetime.now(UTC))
        self._sleep = sleep

    async def run(self) -> None:
        """Follow the stream until cancelled; raise SpireError if the agent refuses for good."""
        await follow(SOURCE, self._open, self, backoff=self._backoff, status=self._status, sleep=self._sleep)

    async def _open(self) -> AsyncGenerator[workload_pb2.X509SVIDResponse, None]:
        async for message in fetch_x509_svid_stream(self._endpoint):
            yield message

    def on_message(self, message: workload_pb2.X509SVIDResponse) -> None:
        """Apply a response whole, or reject it whole; raise SpireError if the node ID never came."""
        try:
            context = parse_x509_svid_response(message, at=self._clock(), node=self._node)
        except SvidError as err:
            self._store.reject(SOURCE, err)
            if err.rule == "node-id-missing":
                if not self._held:
                    raise SpireError(
                        f"spire: {SOURCE}: the agent issues authd no SVID with its node ID: {err}; register "
                        "an entry for that ID, or set node.spiffe_id to the one it should use",
                        retryable=False,
                    ) from err
                self._store.redact_own(str(err))
            return
        if self._store.set_own(context.node_svid, source=SOURCE):
            self._held = True
            self._store.set_bundles(BundleOrigin.WORKLOAD_API, context.bundles)

    def on_undecodable(self) -> None:
        """Count a message that is not protobuf; the last good state stays."""
        self._store.reject(SOURCE, SvidError("undecodable", "message is not a valid X509SVIDResponse"))

    def on_failure(self, failure: StreamFailure) -> None:
        """PERMISSION_DENIED: the agent no longer issues authd an identity; stop using the old one."""
        if failure.code is grpc.StatusCode.PERMISSION_DENIED:
            self._store.redact_own(str(failure.error))


async def fetch_x509_svid_stream(endpoint: Endpoint) -> AsyncGenerator[workload_pb2.X509SVIDResponse, None]:
    """Open FetchX509SVID on a fresh channel and yield its responses until the stream ends or fails."""
    endpoint.check_reachable()
    async with endpoint.channel() as channel:
        method = channel.unary_stream(
            FETCH_X509_SVID,
            request_serializer=workload_pb2.X509SVIDRequest.SerializeToString,
            response_deserializer=workload_pb2.X509SVIDResponse.FromString,
        )
        async for message in method(workload_pb2.X509SVIDRequest(), metadata=SECURITY_HEADER):
            yield message


async def fetch_x509_context(
    endpoint: Endpoint, node: NodeIdentity, *, at: datetime | None = None
) -> X509Context:
    """One-shot: the first FetchX509SVID response, parsed (CLI checks, tests); bound it with a timeout."""
    try:
        async with contextlib.aclosing(fetch_x509_svid_stream(endpoint)) as messages:
            async for message in messages:
                return parse_x509_svid_response(message, at=at or datetime.now(UTC), node=node)
    except (grpc.aio.AioRpcError, OSError) as err:
        raise classify(err, SOURCE).error from err
    raise stream_ended(SOURCE).error
