"""``authd spire sync``: make the SPIRE server's registration entries match the endpoints in cluster state.

Each endpoint gets one entry: its SPIFFE ID, parented to the SPIRE agent of its node (so only that
node's agent issues it, and only that node's authd can fetch it), with its selectors. The sync manages
only the entries it created, which it marks by their hint: ``authd:`` and a digest of the entry's
SPIFFE ID, parent and selectors, so every managed entry has a hint of its own. One shared hint would not
do: of several entries with the same hint that match one caller, SPIRE's agent issues only the oldest,
so a workload whose selectors also match another endpoint's entry would lose its SVID. Entries an older
authd marked with the bare hint ``authd`` are owned too, and replaced by ones with their own hint.
Entries registered by anyone else are never touched. Idempotent: a second run with unchanged cluster
state creates and deletes nothing.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import structlog

from authd.cluster.model import ClusterState
from authd.errors import SpireError
from authd.identity import Selector, SpiffeId
from authd.spire.entries import EntryResult, RegistrationEntry

log = structlog.get_logger(__name__)

MANAGED_HINT_PREFIX = "authd:"
"""How the hint of every entry this sync owns starts (shown by ``spire-server entry show``)."""
LEGACY_HINT = "authd"
"""The one hint older syncs gave every entry they made: still theirs, replaced on the next sync."""

_Key = tuple[SpiffeId, SpiffeId, tuple[Selector, ...]]


class EntryApi(Protocol):
    """The SPIRE server's Entry API subset the sync needs."""

    async def list_entries(self) -> list[RegistrationEntry]:
        """Every entry."""
        ...

    async def create_entries(self, entries: Sequence[RegistrationEntry]) -> list[EntryResult]:
        """Create entries; one result each."""
        ...

    async def delete_entries(self, ids: Sequence[str]) -> list[EntryResult]:
        """Delete entries by ID; one result each."""
        ...


@dataclass
class SyncPlan:
    """What a sync creates and deletes, and how many managed entries already match."""

    create: list[RegistrationEntry] = field(default_factory=list)
    delete: list[RegistrationEntry] = field(default_factory=list)
    unchanged: int = 0

    @property
    def empty(self) -> bool:
        """Whether SPIRE already matches cluster state."""
        return not self.create and not self.delete


def desired_entries(state: ClusterState, nodes: Iterable[str] | None = None) -> list[RegistrationEntry]:
    """One entry per endpoint (of ``nodes`` only, if given), parented to its node's SPIRE agent."""
    wanted = set(nodes) if nodes is not None else None
    entries = []
    for endpoint in sorted(state.endpoints, key=lambda e: (str(e.spiffe_id), e.node)):
        node = state.node(endpoint.node)
        if node is None or (wanted is not None and node.name not in wanted):
            continue
        entries.append(
            RegistrationEntry(
                spiffe_id=endpoint.spiffe_id,
                parent_id=node.spire_agent_id(),
                selectors=tuple(sorted(endpoint.selectors)),
                hint=managed_hint(endpoint.spiffe_id, node.spire_agent_id(), endpoint.selectors),
            )
        )
    return entries


def managed_hint(spiffe_id: SpiffeId, parent_id: SpiffeId, selectors: Iterable[Selector]) -> str:
    """The hint of the managed entry for this ID, parent and selectors: unique to it, and stable."""
    text = "\n".join([str(spiffe_id), str(parent_id), *sorted(str(s) for s in selectors)])
    return MANAGED_HINT_PREFIX + hashlib.sha256(text.encode()).hexdigest()[:32]


def is_managed(entry: RegistrationEntry) -> bool:
    """Whether a sync created ``entry`` (now or before per-entry hints)."""
    return entry.hint == LEGACY_HINT or entry.hint.startswith(MANAGED_HINT_PREFIX)


def plan(
    desired: Iterable[RegistrationEntry],
    existing: Iterable[RegistrationEntry],
    parents: Iterable[SpiffeId] | None,
) -> SyncPlan:
    """Compare desired entries with the managed ones among ``existing``.

    ``parents`` limits deletions to entries under those agents (a sync of some nodes only); None means
    every managed entry is in scope.
    """
    scope = set(parents) if parents is not None else None
    wanted = {_key(entry): entry for entry in desired}
    result = SyncPlan()
    seen: set[_Key] = set()
    for entry in existing:
        if not is_managed(entry) or (scope is not None and entry.parent_id not in scope):
            continue
        key = _key(entry)
        if key in wanted and key not in seen and entry.hint == wanted[key].hint:
            seen.add(key)
            result.unchanged += 1
        else:
            # No longer in cluster state, a duplicate of a kept entry, or one with the legacy shared hint.
            result.delete.append(entry)
    result.create = [entry for key, entry in wanted.items() if key not in seen]
    return result


async def sync(
    api: EntryApi, state: ClusterState, *, nodes: Iterable[str] | None = None, dry_run: bool = False
) -> SyncPlan:
    """Reconcile SPIRE with cluster state; with ``dry_run`` only compute the plan."""
    selected = list(nodes) if nodes is not None else None
    desired = desired_entries(state, selected)
    parents = None
    if selected is not None:
        parents = [n.spire_agent_id() for name in selected if (n := state.node(name)) is not None]
    result = plan(desired, await api.list_entries(), parents)
    if dry_run or result.empty:
        return result
    failures: list[str] = []
    # Create before deleting: an endpoint whose selectors changed has its new entry before its old one
    # goes, so SPIRE never stops issuing its identity in between. An entry only re-hinted (the legacy
    # shared hint) cannot be: SPIRE refuses a second entry with the same ID, parent and selectors, so
    # that one is created after its predecessor is deleted.
    replaced = {_key(entry) for entry in result.delete}
    early = [entry for entry in result.create if _key(entry) not in replaced]
    late = [entry for entry in result.create if _key(entry) in replaced]
    failures += await _create(api, early)
    if result.delete:
        outcomes = await api.delete_entries([entry.id for entry in result.delete])
        failures += [f"delete {r.id}: {r.code.name} {r.message}" for r in outcomes if not r.ok]
    failures += await _create(api, late)
    log.info(
        "spire entries synced",
        created=len(result.create),
        deleted=len(result.delete),
        unchanged=result.unchanged,
    )
    if failures:
        raise SpireError("spire: sync incomplete: " + "; ".join(failures), retryable=True)
    return result


async def _create(api: EntryApi, entries: list[RegistrationEntry]) -> list[str]:
    if not entries:
        return []
    outcomes = await api.create_entries(entries)
    return [
        f"create {entry.spiffe_id}: {r.code.name} {r.message}"
        for entry, r in zip(entries, outcomes, strict=True)
        if not r.ok
    ]


def _key(entry: RegistrationEntry) -> _Key:
    return (entry.spiffe_id, entry.parent_id, tuple(sorted(entry.selectors)))
