"""``authd spire sync``: make the SPIRE server's registration entries match the endpoints in cluster state.

Each endpoint gets one entry: its SPIFFE ID, parented to the SPIRE agent of its node (so only that
node's agent issues it, and only that node's authd can fetch it), with its selectors. The sync manages
only the entries it created, which it marks with the hint ``authd``: entries registered by anyone else
are never touched. Idempotent: a second run with unchanged cluster state creates and deletes nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import structlog

from authd.cluster.model import ClusterState
from authd.errors import SpireError
from authd.identity import Selector, SpiffeId
from authd.spire.entries import EntryResult, RegistrationEntry

log = structlog.get_logger(__name__)

MANAGED_HINT = "authd"
"""The hint marking entries this sync owns (shown by ``spire-server entry show``)."""

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
                hint=MANAGED_HINT,
            )
        )
    return entries


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
        if entry.hint != MANAGED_HINT or (scope is not None and entry.parent_id not in scope):
            continue
        key = _key(entry)
        if key in wanted and key not in seen:
            seen.add(key)
            result.unchanged += 1
        else:
            result.delete.append(entry)  # no longer in cluster state, or a duplicate of a kept entry
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
    # goes, so SPIRE never stops issuing its identity in between.
    if result.create:
        outcomes = await api.create_entries(result.create)
        failures += [
            f"create {entry.spiffe_id}: {r.code.name} {r.message}"
            for entry, r in zip(result.create, outcomes, strict=True)
            if not r.ok
        ]
    if result.delete:
        outcomes = await api.delete_entries([entry.id for entry in result.delete])
        failures += [f"delete {r.id}: {r.code.name} {r.message}" for r in outcomes if not r.ok]
    log.info(
        "spire entries synced",
        created=len(result.create),
        deleted=len(result.delete),
        unchanged=result.unchanged,
    )
    if failures:
        raise SpireError("spire: sync incomplete: " + "; ".join(failures), retryable=True)
    return result


def _key(entry: RegistrationEntry) -> _Key:
    return (entry.spiffe_id, entry.parent_id, tuple(sorted(entry.selectors)))
