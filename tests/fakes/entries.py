"""An in-memory SPIRE Entry API that records the order of the calls made to it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import grpc

from authd.spire.entries import EntryResult, RegistrationEntry


@dataclass
class RecordingEntryApi:
    """Entries by ID; ``calls`` lists ("create"|"delete", SPIFFE IDs) in the order they were made."""

    entries: dict[str, RegistrationEntry] = field(default_factory=dict)
    calls: list[tuple[str, list[str]]] = field(default_factory=list)

    async def list_entries(self) -> list[RegistrationEntry]:
        return list(self.entries.values())

    async def create_entries(self, entries: Sequence[RegistrationEntry]) -> list[EntryResult]:
        self.calls.append(("create", [str(entry.spiffe_id) for entry in entries]))
        results = []
        for entry in entries:
            created = replace(entry, id=f"e{len(self.entries) + len(self.calls)}-{entry.spiffe_id.path}")
            self.entries[created.id] = created
            results.append(EntryResult(grpc.StatusCode.OK, "", created, created.id))
        return results

    async def delete_entries(self, ids: Sequence[str]) -> list[EntryResult]:
        self.calls.append(("delete", [str(self.entries[i].spiffe_id) for i in ids]))
        for entry_id in ids:
            del self.entries[entry_id]
        return [EntryResult(grpc.StatusCode.OK, "", None, entry_id) for entry_id in ids]
