"""Entry API client: registration entries on the SPIRE server (list, batch create, batch delete).

Used by ``authd spire sync`` to register local workloads; talks to the server's local API socket (the
caller is trusted for being local, as SPIRE does for ``socket_path``). Batch calls return one result per
item, in order; a per-item failure (``ALREADY_EXISTS``, ``NOT_FOUND``, ``INVALID_ARGUMENT``) is a result,
not an exception. Transport and whole-call failures raise :class:`~authd.errors.SpireError`, classified
by :func:`authd.spire.stream.classify`.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

import grpc

from authd.errors import SpiffeIdError, SvidError
from authd.identity import Selector, SpiffeId, TrustDomain
from authd.spire._proto import entry_pb2, types_pb2
from authd.spire.delegated import selectors_to_proto, spiffe_id_from_proto
from authd.spire.endpoint import Endpoint
from authd.spire.stream import classify

_SERVICE = "/spire.api.server.entry.v1.Entry"
LIST_ENTRIES = f"{_SERVICE}/ListEntries"
BATCH_CREATE_ENTRY = f"{_SERVICE}/BatchCreateEntry"
BATCH_DELETE_ENTRY = f"{_SERVICE}/BatchDeleteEntry"

DEFAULT_PAGE_SIZE = 500
DEFAULT_TIMEOUT = 30.0


class SelectorMatch(enum.IntEnum):
    """How ListEntries compares an entry's selectors with the filter's (SPIRE's MatchBehavior)."""

    EXACT = 0
    SUBSET = 1
    SUPERSET = 2
    ANY = 3


@dataclass(frozen=True, slots=True)
class RegistrationEntry:
    """A SPIRE registration entry: who (selectors, under which parent) gets which SPIFFE ID."""

    spiffe_id: SpiffeId
    parent_id: SpiffeId
    selectors: tuple[Selector, ...]
    x509_svid_ttl: int = 0
    federates_with: tuple[TrustDomain, ...] = ()
    hint: str = ""
    admin: bool = False
    downstream: bool = False
    dns_names: tuple[str, ...] = ()
    id: str = ""
    created_at: int = 0
    revision_number: int = 0

    def to_proto(self) -> types_pb2.Entry:
        """The entry as SPIRE's ``spire.api.types.Entry``."""
        return types_pb2.Entry(
            id=self.id,
            spiffe_id=spiffe_id_to_proto(self.spiffe_id),
            parent_id=spiffe_id_to_proto(self.parent_id),
            selectors=selectors_to_proto(self.selectors),
            x509_svid_ttl=self.x509_svid_ttl,
            federates_with=[td.name for td in self.federates_with],
            admin=self.admin,
            downstream=self.downstream,
            dns_names=list(self.dns_names),
            hint=self.hint,
            created_at=self.created_at,
            revision_number=self.revision_number,
        )

    @classmethod
    def from_proto(cls, entry: types_pb2.Entry) -> RegistrationEntry:
        """Parse ``spire.api.types.Entry``; raise SvidError("spiffe-id") for an ID that does not parse."""
        try:
            federates_with = tuple(TrustDomain.parse(td) for td in entry.federates_with)
        except SpiffeIdError as err:
            raise SvidError("spiffe-id", f"entry {entry.id}: federates_with: {err}") from err
        return cls(
            spiffe_id=spiffe_id_from_proto(entry.spiffe_id),
            parent_id=spiffe_id_from_proto(entry.parent_id),
            selectors=tuple(Selector(s.type, s.value) for s in entry.selectors),
            x509_svid_ttl=entry.x509_svid_ttl,
            federates_with=federates_with,
            hint=entry.hint,
            admin=entry.admin,
            downstream=entry.downstream,
            dns_names=tuple(entry.dns_names),
            id=entry.id,
            created_at=entry.created_at,
            revision_number=entry.revision_number,
        )


@dataclass(frozen=True, slots=True)
class EntryResult:
    """The outcome of one item of a batch call: a gRPC status, and the entry or ID concerned."""

    code: grpc.StatusCode
    message: str
    entry: RegistrationEntry | None = None
    id: str = ""

    @property
    def ok(self) -> bool:
        """Whether the item succeeded."""
        return self.code is grpc.StatusCode.OK


def spiffe_id_to_proto(spiffe_id: SpiffeId) -> types_pb2.SPIFFEID:
    """A SpiffeId as SPIRE's ``spire.api.types.SPIFFEID`` (trust domain name and path)."""
    return types_pb2.SPIFFEID(trust_domain=spiffe_id.trust_domain.name, path=spiffe_id.path)


def status_code(code: int) -> grpc.StatusCode:
    """Map a google.rpc code number to grpc.StatusCode (UNKNOWN for numbers gRPC does not define)."""
    for candidate in grpc.StatusCode:
        if candidate.value[0] == code:
            return candidate
    return grpc.StatusCode.UNKNOWN


class EntryClient:
    """A connection to the SPIRE server's Entry API on its local socket."""

    def __init__(self, socket: Path, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        """Open a channel to ``socket`` (connecting lazily, on the first call)."""
        self._endpoint = Endpoint.unix(socket)
        self._timeout = timeout
        self._channel = self._endpoint.channel()

    async def close(self) -> None:
        """Close the channel."""
        await self._channel.close()

    async def __aenter__(self) -> Self:
        """Use as an async context manager."""
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        """Close the channel."""
        await self.close()

    async def list_entries(
        self,
        *,
        spiffe_id: SpiffeId | None = None,
        parent_id: SpiffeId | None = None,
        selectors: Iterable[Selector] | None = None,
        match: SelectorMatch = SelectorMatch.EXACT,
        page_size: int = DEFAULT_PAGE_SIZE,
    ) -> list[RegistrationEntry]:
        """Every entry matching the filters, following pages until the server says there are no more."""
        filters = entry_pb2.ListEntriesRequest.Filter()
        if spiffe_id is not None:
            filters.by_spiffe_id.CopyFrom(spiffe_id_to_proto(spiffe_id))
        if parent_id is not None:
            filters.by_parent_id.CopyFrom(spiffe_id_to_proto(parent_id))
        if selectors is not None:
            filters.by_selectors.CopyFrom(
                types_pb2.SelectorMatch(
                    selectors=selectors_to_proto(selectors),
                    match=types_pb2.SelectorMatch.MatchBehavior.ValueType(match.value),
                )
            )
        method = self._channel.unary_unary(
            LIST_ENTRIES,
            request_serializer=entry_pb2.ListEntriesRequest.SerializeToString,
            response_deserializer=entry_pb2.ListEntriesResponse.FromString,
        )
        entries: list[RegistrationEntry] = []
        token = ""
        while True:
            request = entry_pb2.ListEntriesRequest(filter=filters, page_size=page_size, page_token=token)
            try:
                response = await method(request, timeout=self._timeout)
            except grpc.aio.AioRpcError as err:
                raise classify(err, "entry-api ListEntries").error from err
            entries.extend(RegistrationEntry.from_proto(entry) for entry in response.entries)
            token = response.next_page_token
            if not token:
                return entries

    async def create_entries(self, entries: Sequence[RegistrationEntry]) -> list[EntryResult]:
        """BatchCreateEntry: one result per entry, in order; ``ALREADY_EXISTS`` carries the existing entry."""
        method = self._channel.unary_unary(
            BATCH_CREATE_ENTRY,
            request_serializer=entry_pb2.BatchCreateEntryRequest.SerializeToString,
            response_deserializer=entry_pb2.BatchCreateEntryResponse.FromString,
        )
        request = entry_pb2.BatchCreateEntryRequest(entries=[entry.to_proto() for entry in entries])
        try:
            response = await method(request, timeout=self._timeout)
        except grpc.aio.AioRpcError as err:
            raise classify(err, "entry-api BatchCreateEntry").error from err
        return [
            EntryResult(
                status_code(result.status.code),
                result.status.message,
                RegistrationEntry.from_proto(result.entry) if result.HasField("entry") else None,
                result.entry.id,
            )
            for result in response.results
        ]

    async def delete_entries(self, ids: Sequence[str]) -> list[EntryResult]:
        """BatchDeleteEntry: one result per ID, in order (``NOT_FOUND`` for unknown IDs)."""
        method = self._channel.unary_unary(
            BATCH_DELETE_ENTRY,
            request_serializer=entry_pb2.BatchDeleteEntryRequest.SerializeToString,
            response_deserializer=entry_pb2.BatchDeleteEntryResponse.FromString,
        )
        try:
            response = await method(entry_pb2.BatchDeleteEntryRequest(ids=list(ids)), timeout=self._timeout)
        except grpc.aio.AioRpcError as err:
            raise classify(err, "entry-api BatchDeleteEntry").error from err
        return [
            EntryResult(status_code(result.status.code), result.status.message, id=result.id)
            for result in response.results
        ]
