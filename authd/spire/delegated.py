"""Delegated Identity API client: local workloads' SVIDs by their selectors, and every trust bundle.

Over the agent's admin socket (no security header needed; the agent attests authd itself by its peer
credentials and admits it only if its SPIFFE ID is an ``authorized_delegate``):

* ``SubscribeToX509Bundles``: every bundle the agent tracks (local and federated), keyed
  ``spiffe://<td>``; applied to the store whole, or rejected whole. SPIRE never drops a trust domain from
  the set it sends on an open stream, so a federation removed at the server would stay trusted for as
  long as the stream lasts: the stream is reopened every ``spire.bundle_stream_reopen``, without a gap
  or a backoff, and the fresh stream's first set, which is the agent's current one, replaces the old.
* ``SubscribeToX509SVIDs``: one stream per distinct selector set among the local workloads. Each message
  lists every SVID those selectors are entitled to; authd keeps only the SVID whose SPIFFE ID is the one
  expected for that workload, so a node never holds keys it does not need. An expected ID missing from a
  well-formed message means SPIRE no longer issues it (entry deleted, selectors changed): it is removed.

The set of local workloads comes from the caller (:meth:`DelegatedIdentityClient.set_workloads`) and
may change at any time; streams are opened and closed to match. A stream the agent refuses for good
(``INVALID_ARGUMENT`` for unparsable selectors) stops alone; the others carry on.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import grpc
import structlog

from authd.backoff import BackoffFactory
from authd.errors import SpiffeIdError, SpireError, SvidError
from authd.identity import Selector, SpiffeId, TrustDomain
from authd.spire._proto import delegatedidentity_pb2, types_pb2
from authd.spire.bundles import parse_bundle_map
from authd.spire.endpoint import Endpoint
from authd.spire.stream import Sleep, StreamFailure, StreamStatus, follow, unwrap_spire_error
from authd.svids import BundleOrigin, SvidStore
from authd.x509svid import X509Svid, parse_svid

log = structlog.get_logger(__name__)

_SERVICE = "/spire.api.agent.delegatedidentity.v1.DelegatedIdentity"
SUBSCRIBE_X509_SVIDS = f"{_SERVICE}/SubscribeToX509SVIDs"
SUBSCRIBE_X509_BUNDLES = f"{_SERVICE}/SubscribeToX509Bundles"

SOURCE = "delegated-identity-api"
BUNDLES_STREAM = "delegated-bundles"

SelectorSet = frozenset[Selector]

DEFAULT_BUNDLE_REOPEN = 300.0


def selectors_to_proto(selectors: Iterable[Selector]) -> list[types_pb2.Selector]:
    """Selectors as SPIRE's ``spire.api.types.Selector`` messages, in a stable order."""
    return [types_pb2.Selector(type=s.type, value=s.value) for s in sorted(selectors)]


def spiffe_id_from_proto(message: types_pb2.SPIFFEID) -> SpiffeId:
    """A ``spire.api.types.SPIFFEID`` as a parsed SpiffeId; raise SvidError if it is not one."""
    try:
        return SpiffeId.from_parts(TrustDomain.parse(message.trust_domain), message.path)
    except SpiffeIdError as err:
        raise SvidError("spiffe-id", f"{message.trust_domain!r} {message.path!r}: {err}") from err


def parse_svid_with_key(item: delegatedidentity_pb2.X509SVIDWithKey) -> X509Svid:
    """Parse one delegated SVID: DER chain, PKCS#8 key, and the ``id`` field matching the leaf."""
    if not item.HasField("x509_svid"):
        raise SvidError("empty-svid", "x509_svid is missing")
    claimed = spiffe_id_from_proto(item.x509_svid.id)
    svid = parse_svid(list(item.x509_svid.cert_chain), item.x509_svid_key, hint=item.x509_svid.hint)
    if svid.spiffe_id != claimed:
        raise SvidError(
            "spiffe-id-mismatch", f"x509_svid.id is {claimed} but its certificate is {svid.spiffe_id}"
        )
    return svid


@dataclass
class _Stream:
    """One SubscribeToX509SVIDs stream: its selectors, the IDs wanted from it, its last message."""

    selectors: SelectorSet
    expected: set[SpiffeId] = field(default_factory=set)
    last: delegatedidentity_pb2.SubscribeToX509SVIDsResponse | None = None
    task: asyncio.Task[None] | None = None
    refused: bool = False

    @property
    def answered(self) -> bool:
        """Whether SPIRE has said its piece: a first message, or a refusal for good."""
        return self.last is not None or self.refused

    @property
    def name(self) -> str:
        return "delegated-svids[" + ",".join(str(s) for s in sorted(self.selectors)) + "]"


class DelegatedIdentityClient:
    """Keeps local workload SVIDs and all bundles in the store, following the wanted workloads."""

    def __init__(
        self,
        endpoint: Endpoint,
        store: SvidStore,
        *,
        backoff: BackoffFactory,
        status: StreamStatus,
        bundle_reopen: float = DEFAULT_BUNDLE_REOPEN,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        """Nothing connects until :meth:`run`; workloads may be set before (the store checks expiry).

        ``bundle_reopen``: seconds after which the bundle stream is replaced by a fresh one.
        """
        self._endpoint = endpoint
        self._store = store
        self._backoff = backoff
        self._bundle_reopen = bundle_reopen
        self._status = status
        self._sleep = sleep
        self._wanted: dict[SpiffeId, SelectorSet] = {}
        self._streams: dict[SelectorSet, _Stream] = {}
        self._changed = asyncio.Event()
        self._group: asyncio.TaskGroup | None = None

    # ------------------------------------------------------------------------------------------ control

    def set_workloads(self, workloads: Mapping[SpiffeId, Iterable[Selector]]) -> None:
        """Set the local workloads: SPIFFE ID -> the selectors SPIRE knows it by (replaces the last set)."""
        wanted: dict[SpiffeId, SelectorSet] = {}
        for spiffe_id, selectors in workloads.items():
            selector_set = frozenset(selectors)
            if not selector_set:
                log.warning("workload has no selectors, not subscribed", spiffe_id=str(spiffe_id))
                continue
            wanted[spiffe_id] = selector_set
        self._wanted = wanted
        self._changed.set()

    @property
    def workloads(self) -> Mapping[SpiffeId, SelectorSet]:
        """The workloads currently wanted."""
        return dict(self._wanted)

    async def run(self) -> None:
        """Follow the bundle stream and one SVID stream per selector set; raise SpireError if refused."""
        try:
            async with asyncio.TaskGroup() as group:
                self._group = group
                group.create_task(self._follow_bundles(), name=BUNDLES_STREAM)
                while True:
                    self._changed.clear()
                    self._reconcile()
                    await self._changed.wait()
        except ExceptionGroup as failures:
            error = unwrap_spire_error(failures)
            if error is failures:
                raise
            raise error from failures
        finally:
            self._group = None
            self._streams.clear()

    def _reconcile(self) -> None:
        group = self._group
        if group is None:
            return
        by_selectors: dict[SelectorSet, set[SpiffeId]] = {}
        for spiffe_id, selectors in self._wanted.items():
            by_selectors.setdefault(selectors, set()).add(spiffe_id)
        for selectors in self._streams.keys() - by_selectors.keys():
            closed = self._streams.pop(selectors)
            if closed.task is not None:
                closed.task.cancel()
            self._status.stream_closed(closed.name)
        for selectors, expected in by_selectors.items():
            stream = self._streams.get(selectors)
            if stream is None:
                stream = _Stream(selectors, set(expected))
                self._streams[selectors] = stream
                stream.task = group.create_task(self._follow_svids(stream), name=stream.name)
            elif stream.expected != expected:
                stream.expected = set(expected)
                self._reapply(stream)
        for spiffe_id in list(self._store.local_svids()):
            if spiffe_id not in self._wanted:
                self._store.remove_local(spiffe_id, "workload no longer on this node")
        self._report_synced()

    def _report_synced(self) -> None:
        self._store.set_local_synced(all(stream.answered for stream in self._streams.values()))

    # ------------------------------------------------------------------------------------------ bundles

    async def _follow_bundles(self) -> None:
        await follow(
            BUNDLES_STREAM,
            self._open_bundles,
            _BundleHandler(self),
            backoff=self._backoff,
            status=self._status,
            sleep=self._sleep,
        )

    async def _open_bundles(
        self,
    ) -> AsyncGenerator[delegatedidentity_pb2.SubscribeToX509BundlesResponse, None]:
        """One continuing flow of bundle messages, over a fresh stream every ``bundle_reopen`` seconds."""
        self._endpoint.check_reachable()
        loop = asyncio.get_running_loop()
        async with self._endpoint.channel() as channel:
            method = channel.unary_stream(
                SUBSCRIBE_X509_BUNDLES,
                request_serializer=delegatedidentity_pb2.SubscribeToX509BundlesRequest.SerializeToString,
                response_deserializer=delegatedidentity_pb2.SubscribeToX509BundlesResponse.FromString,
            )
            while True:
                call = method(delegatedidentity_pb2.SubscribeToX509BundlesRequest())
                # The reopen cancels the call from a timer: a read wrapped in wait_for, cancelled at
                # its timeout, left grpc's call machinery in a state that stalled later channels.
                reopened = asyncio.Event()

                def reopen(
                    call: grpc.aio.UnaryStreamCall[Any, Any] = call, done: asyncio.Event = reopened
                ) -> None:
                    done.set()
                    call.cancel()

                timer = loop.call_later(self._bundle_reopen, reopen)
                try:
                    while True:
                        try:
                            message = await call.read()
                        except asyncio.CancelledError:
                            task = asyncio.current_task()
                            if reopened.is_set() and (task is None or not task.cancelling()):
                                break  # our own reopen, not a cancellation of this task
                            raise
                        if message is grpc.aio.EOF:
                            return  # the agent ended the stream: follow() decides what that means
                        # None when it did not deserialize, as when iterating the call (follow() counts it).
                        yield cast("delegatedidentity_pb2.SubscribeToX509BundlesResponse", message)
                finally:
                    timer.cancel()
                    call.cancel()
                log.debug("bundle stream reopened", after_s=self._bundle_reopen)

    def _apply_bundles(self, message: delegatedidentity_pb2.SubscribeToX509BundlesResponse) -> None:
        try:
            bundles = parse_bundle_map(message.ca_certificates)
        except SvidError as err:
            self._store.reject(SOURCE, err)
            return
        if not bundles:
            self._store.reject(SOURCE, SvidError("empty-bundles", "bundle update carries no trust domain"))
            return
        self._store.set_bundles(BundleOrigin.DELEGATED_IDENTITY_API, bundles)

    # ------------------------------------------------------------------------------------------ SVIDs

    async def _follow_svids(self, stream: _Stream) -> None:
        try:
            await follow(
                stream.name,
                lambda: self._open_svids(stream.selectors),
                _SvidHandler(self, stream),
                backoff=self._backoff,
                status=self._status,
                sleep=self._sleep,
            )
        except SpireError:
            # Already logged where the decision was made; this stream stays down, the others go on.
            stream.refused = True
            for spiffe_id in stream.expected:
                self._store.remove_local(spiffe_id, "SPIRE refused the subscription")
            self._report_synced()

    async def _open_svids(
        self, selectors: SelectorSet
    ) -> AsyncGenerator[delegatedidentity_pb2.SubscribeToX509SVIDsResponse, None]:
        self._endpoint.check_reachable()
        request = delegatedidentity_pb2.SubscribeToX509SVIDsRequest(selectors=selectors_to_proto(selectors))
        async with self._endpoint.channel() as channel:
            method = channel.unary_stream(
                SUBSCRIBE_X509_SVIDS,
                request_serializer=delegatedidentity_pb2.SubscribeToX509SVIDsRequest.SerializeToString,
                response_deserializer=delegatedidentity_pb2.SubscribeToX509SVIDsResponse.FromString,
            )
            async for message in method(request):
                yield message

    def _apply_svids(
        self, stream: _Stream, message: delegatedidentity_pb2.SubscribeToX509SVIDsResponse
    ) -> None:
        candidates: dict[SpiffeId, list[delegatedidentity_pb2.X509SVIDWithKey]] = {}
        for item in message.x509_svids:
            try:
                spiffe_id = spiffe_id_from_proto(item.x509_svid.id)
            except SvidError as err:
                # Whose SVID this was is unknown, so no absence can be concluded: the message is dropped.
                self._store.reject(SOURCE, err)
                return
            if spiffe_id in stream.expected:
                candidates.setdefault(spiffe_id, []).append(item)
        stream.last = message
        for spiffe_id in sorted(stream.expected):
            items = candidates.get(spiffe_id)
            if not items:
                self._store.remove_local(spiffe_id, "SPIRE issues no SVID with this ID for these selectors")
                continue
            good: list[X509Svid] = []
            for item in items:
                try:
                    good.append(parse_svid_with_key(item))
                except SvidError as err:
                    self._store.reject(SOURCE, err)
            if good:
                # Two entries may give the same ID; the longest-lived SVID is a stable choice.
                self._store.set_local(spiffe_id, max(good, key=lambda svid: svid.not_after), source=SOURCE)
        self._report_synced()

    def _reapply(self, stream: _Stream) -> None:
        """The IDs wanted from a stream changed: take them from its last message, without waiting."""
        if stream.last is not None:
            self._apply_svids(stream, stream.last)

    def _redact(self, stream: _Stream, reason: str) -> None:
        for spiffe_id in stream.expected:
            self._store.remove_local(spiffe_id, reason)


class _BundleHandler:
    def __init__(self, client: DelegatedIdentityClient) -> None:
        self._client = client

    def on_message(self, message: delegatedidentity_pb2.SubscribeToX509BundlesResponse) -> None:
        self._client._apply_bundles(message)  # noqa: SLF001 - handler and client are one unit

    def on_undecodable(self) -> None:
        self._client._store.reject(SOURCE, SvidError("undecodable", "bundle update is not valid protobuf"))  # noqa: SLF001

    def on_failure(self, failure: StreamFailure) -> None:
        """Bundles are public; an outage keeps them (verification needs them until SPIRE is back)."""


class _SvidHandler:
    def __init__(self, client: DelegatedIdentityClient, stream: _Stream) -> None:
        self._client = client
        self._stream = stream

    def on_message(self, message: delegatedidentity_pb2.SubscribeToX509SVIDsResponse) -> None:
        self._client._apply_svids(self._stream, message)  # noqa: SLF001

    def on_undecodable(self) -> None:
        self._client._store.reject(SOURCE, SvidError("undecodable", "SVID update is not valid protobuf"))  # noqa: SLF001

    def on_failure(self, failure: StreamFailure) -> None:
        """PERMISSION_DENIED: authd is no longer an authorized delegate; stop using these SVIDs."""
        if failure.code is grpc.StatusCode.PERMISSION_DENIED:
            self._client._redact(self._stream, str(failure.error))  # noqa: SLF001
