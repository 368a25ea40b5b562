"""dev-spire's server Entry API subset: ListEntries, BatchCreateEntry, BatchDeleteEntry.

Served on the server's local socket, where SPIRE trusts every caller for being local. Batch calls answer
one result per item, in order, with SPIRE's per-item status codes; ListEntries filters like SPIRE
(``by_spiffe_id``, ``by_parent_id``, ``by_selectors`` with a match behaviour, ``by_federates_with``,
``by_hint``) and pages with an opaque token.
"""

from __future__ import annotations

import grpc
import structlog
from grpclib.const import Cardinality, Handler, Status
from grpclib.exceptions import GRPCError
from grpclib.server import Stream

from authd.errors import SpiffeIdError, SvidError
from authd.identity import Selector, SpiffeId, TrustDomain
from authd.spire._proto import entry_pb2, types_pb2
from authd.spire.delegated import spiffe_id_from_proto
from authd.spire.dev.registry import EntryRegistry, Outcome
from authd.spire.entries import RegistrationEntry, SelectorMatch

log = structlog.get_logger(__name__)

_SERVICE = "/spire.api.server.entry.v1.Entry"

ListStream = Stream[entry_pb2.ListEntriesRequest, entry_pb2.ListEntriesResponse]
CreateStream = Stream[entry_pb2.BatchCreateEntryRequest, entry_pb2.BatchCreateEntryResponse]
DeleteStream = Stream[entry_pb2.BatchDeleteEntryRequest, entry_pb2.BatchDeleteEntryResponse]


def _status(code: grpc.StatusCode, message: str) -> types_pb2.Status:
    return types_pb2.Status(code=code.value[0], message=message)


class EntryService:
    """The Entry API over a registry, as grpclib handlers."""

    def __init__(self, registry: EntryRegistry) -> None:
        """Serve ``registry``."""
        self._registry = registry

    def __mapping__(self) -> dict[str, Handler]:
        """The method table grpclib dispatches on."""
        return {
            f"{_SERVICE}/ListEntries": Handler(
                self.list_entries,
                Cardinality.UNARY_UNARY,
                entry_pb2.ListEntriesRequest,
                entry_pb2.ListEntriesResponse,
            ),
            f"{_SERVICE}/BatchCreateEntry": Handler(
                self.batch_create_entry,
                Cardinality.UNARY_UNARY,
                entry_pb2.BatchCreateEntryRequest,
                entry_pb2.BatchCreateEntryResponse,
            ),
            f"{_SERVICE}/BatchDeleteEntry": Handler(
                self.batch_delete_entry,
                Cardinality.UNARY_UNARY,
                entry_pb2.BatchDeleteEntryRequest,
                entry_pb2.BatchDeleteEntryResponse,
            ),
        }

    async def list_entries(self, stream: ListStream) -> None:
        """Entries passing the filter, one page at a time."""
        request = await stream.recv_message()
        if request is None:
            raise GRPCError(Status.INVALID_ARGUMENT, "missing request")
        entries = self._filtered(request.filter) if request.HasField("filter") else self._registry.all()
        if request.page_size < 0:
            raise GRPCError(Status.INVALID_ARGUMENT, "page size must not be negative")
        if request.page_token:
            entries = [entry for entry in entries if entry.id > request.page_token]
        token = ""
        if request.page_size and len(entries) > request.page_size:
            entries = entries[: request.page_size]
            token = entries[-1].id
        await stream.send_message(
            entry_pb2.ListEntriesResponse(
                entries=[entry.to_proto() for entry in entries], next_page_token=token
            )
        )

    def _filtered(self, query: entry_pb2.ListEntriesRequest.Filter) -> list[RegistrationEntry]:
        try:
            spiffe_id = spiffe_id_from_proto(query.by_spiffe_id) if query.HasField("by_spiffe_id") else None
            parent_id = spiffe_id_from_proto(query.by_parent_id) if query.HasField("by_parent_id") else None
            domains = (
                [TrustDomain.parse(td) for td in query.by_federates_with.trust_domains]
                if query.HasField("by_federates_with")
                else None
            )
        except (SvidError, SpiffeIdError) as err:
            raise GRPCError(Status.INVALID_ARGUMENT, f"malformed filter: {err}") from err
        selectors = (
            [Selector(s.type, s.value) for s in query.by_selectors.selectors]
            if query.HasField("by_selectors")
            else None
        )
        return self._registry.find(
            spiffe_id=spiffe_id,
            parent_id=parent_id,
            selectors=selectors,
            match=SelectorMatch(query.by_selectors.match),
            federates_with=domains,
            federates_match=SelectorMatch(query.by_federates_with.match),
            hint=query.by_hint,
        )

    async def batch_create_entry(self, stream: CreateStream) -> None:
        """Create each entry; one result per entry, in order."""
        request = await stream.recv_message()
        if request is None:
            raise GRPCError(Status.INVALID_ARGUMENT, "missing request")
        results = []
        for proto in request.entries:
            outcome = _convert(proto)
            if isinstance(outcome, RegistrationEntry):
                outcome = self._registry.create(outcome)
            if outcome.code is grpc.StatusCode.OK and outcome.entry is not None:
                log.info("entry created", entry_id=outcome.entry.id, spiffe_id=str(outcome.entry.spiffe_id))
            result = entry_pb2.BatchCreateEntryResponse.Result(status=_status(outcome.code, outcome.message))
            if outcome.entry is not None:
                result.entry.CopyFrom(outcome.entry.to_proto())
            results.append(result)
        await stream.send_message(entry_pb2.BatchCreateEntryResponse(results=results))

    async def batch_delete_entry(self, stream: DeleteStream) -> None:
        """Delete each entry; one result per ID, in order."""
        request = await stream.recv_message()
        if request is None:
            raise GRPCError(Status.INVALID_ARGUMENT, "missing request")
        results = []
        for entry_id in request.ids:
            outcome = self._registry.delete(entry_id)
            if outcome.code is grpc.StatusCode.OK:
                log.info("entry deleted", entry_id=entry_id)
            results.append(
                entry_pb2.BatchDeleteEntryResponse.Result(
                    status=_status(outcome.code, outcome.message), id=entry_id
                )
            )
        await stream.send_message(entry_pb2.BatchDeleteEntryResponse(results=results))


def _convert(proto: types_pb2.Entry) -> RegistrationEntry | Outcome:
    """A request's entry, or the INVALID_ARGUMENT outcome SPIRE gives when it does not convert."""
    fields: dict[str, SpiffeId] = {}
    for name, label in (("parent_id", "parent ID"), ("spiffe_id", "spiffe ID")):
        try:
            fields[name] = spiffe_id_from_proto(getattr(proto, name))
        except SvidError as err:
            return Outcome(
                grpc.StatusCode.INVALID_ARGUMENT, f"failed to convert entry: invalid {label}: {err}"
            )
    try:
        federates_with = tuple(TrustDomain.parse(td) for td in proto.federates_with)
    except SpiffeIdError as err:
        return Outcome(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"failed to convert entry: invalid federated trust domain: {err}",
        )
    return RegistrationEntry(
        spiffe_id=fields["spiffe_id"],
        parent_id=fields["parent_id"],
        selectors=tuple(Selector(s.type, s.value) for s in proto.selectors),
        x509_svid_ttl=proto.x509_svid_ttl,
        federates_with=federates_with,
        hint=proto.hint,
        admin=proto.admin,
        downstream=proto.downstream,
        dns_names=tuple(proto.dns_names),
    )
