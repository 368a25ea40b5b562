"""dev-spire's registration entries: validated like SPIRE's server does, listed, seeded from TOML.

An entry gives a SPIFFE ID to workloads whose attested selectors include all of the entry's selectors,
on the node whose agent is the entry's parent (``spiffe://<td>/spire/agent/<node>``). Creating an entry
similar to an existing one (same SPIFFE ID, parent and selector set) yields ``ALREADY_EXISTS`` with the
existing entry, as in SPIRE.

The ``--entries`` file is TOML, decoded by the same schema code as authd's config::

    [[entry]]
    spiffe_id = "spiffe://example.org/web"
    node = "node-a"
    selectors = ["unix:uid:1000"]
    ttl = 300                      # optional, seconds; default --svid-ttl
    federates_with = ["other.org"] # optional
    hint = "internal"              # optional
"""

from __future__ import annotations

import time
import tomllib
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import grpc

from authd.config.schema import decode, setting
from authd.errors import ConfigError, SpiffeIdError
from authd.identity import Selector, SpiffeId, TrustDomain
from authd.spire.entries import RegistrationEntry, SelectorMatch

MAX_HINT = 1024

T = TypeVar("T")


def agent_id(trust_domain: TrustDomain, node: str) -> SpiffeId:
    """The SPIFFE ID of the agent on ``node``, the parent of that node's workload entries."""
    return SpiffeId.from_parts(trust_domain, f"/spire/agent/{node}")


@dataclass(frozen=True, slots=True)
class Outcome:
    """One batch item's result: status code, message, and the entry concerned."""

    code: grpc.StatusCode
    message: str
    entry: RegistrationEntry | None = None


class EntryRegistry:
    """Entries by ID; ``on_change`` is called after every create or delete."""

    def __init__(
        self, trust_domain: TrustDomain, known_domains: Iterable[TrustDomain], on_change: Callable[[], None]
    ) -> None:
        """``known_domains``: trust domains with a bundle, the only ones an entry may federate with."""
        self.trust_domain = trust_domain
        self._known = frozenset(known_domains)
        self._on_change = on_change
        self._entries: dict[str, RegistrationEntry] = {}

    def __len__(self) -> int:
        """How many entries exist."""
        return len(self._entries)

    def all(self) -> list[RegistrationEntry]:
        """Every entry, sorted by ID (SPIRE's order)."""
        return [self._entries[key] for key in sorted(self._entries)]

    def for_parent(self, parent_id: SpiffeId) -> list[RegistrationEntry]:
        """Entries an agent issues: those parented to it, by ID."""
        return [entry for entry in self.all() if entry.parent_id == parent_id]

    def create(self, entry: RegistrationEntry) -> Outcome:
        """Validate and add ``entry`` (its ``id`` and ``created_at`` are assigned here)."""
        problem = self._problem(entry)
        if problem:
            return Outcome(grpc.StatusCode.INVALID_ARGUMENT, f"failed to convert entry: {problem}")
        selectors = frozenset(entry.selectors)
        for existing in self._entries.values():
            if (existing.spiffe_id, existing.parent_id, frozenset(existing.selectors)) == (
                entry.spiffe_id,
                entry.parent_id,
                selectors,
            ):
                return Outcome(grpc.StatusCode.ALREADY_EXISTS, "similar entry already exists", existing)
        created = replace(
            entry,
            id=str(uuid.uuid4()),
            created_at=int(time.time()),
            federates_with=tuple(sorted(set(entry.federates_with))),
        )
        self._entries[created.id] = created
        self._on_change()
        return Outcome(grpc.StatusCode.OK, "OK", created)

    def delete(self, entry_id: str) -> Outcome:
        """Remove the entry ``entry_id``."""
        entry = self._entries.pop(entry_id, None)
        if entry is None:
            return Outcome(grpc.StatusCode.NOT_FOUND, "entry not found")
        self._on_change()
        return Outcome(grpc.StatusCode.OK, "OK", entry)

    def _id_problem(self, entry: RegistrationEntry) -> str | None:
        domain = self.trust_domain
        if not entry.parent_id.member_of(domain):
            return f'invalid parent ID: "{entry.parent_id}" is not a member of trust domain "{domain}"'
        if not entry.spiffe_id.member_of(domain):
            return f'invalid spiffe ID: "{entry.spiffe_id}" is not a member of trust domain "{domain}"'
        if entry.spiffe_id.is_root:
            return f'invalid spiffe ID: "{entry.spiffe_id}" must have a path'
        return None

    def _problem(self, entry: RegistrationEntry) -> str | None:  # noqa: PLR0911 - one return per SPIRE rule
        id_problem = self._id_problem(entry)
        if id_problem:
            return id_problem
        if not entry.selectors:
            return "selector list is empty"
        for selector in entry.selectors:
            problem = selector_problem(selector)
            if problem:
                return f"invalid selector: {problem}"
        if entry.x509_svid_ttl < 0:
            return "x509SvidTtl is not valid"
        if len(entry.hint) > MAX_HINT:
            return f"hint is too long, max length is {MAX_HINT} characters"
        for trust_domain in entry.federates_with:
            if trust_domain not in self._known or trust_domain == self.trust_domain:
                return f'unable to find federated bundle "{trust_domain.id_string()}"'
        return None

    def find(
        self,
        *,
        spiffe_id: SpiffeId | None = None,
        parent_id: SpiffeId | None = None,
        selectors: Iterable[Selector] | None = None,
        match: SelectorMatch = SelectorMatch.EXACT,
        federates_with: Iterable[TrustDomain] | None = None,
        federates_match: SelectorMatch = SelectorMatch.EXACT,
        hint: str = "",
    ) -> list[RegistrationEntry]:
        """Entries passing every given filter, by ID."""
        wanted = frozenset(selectors) if selectors is not None else None
        domains = frozenset(federates_with) if federates_with is not None else None
        return [
            entry
            for entry in self.all()
            if (spiffe_id is None or entry.spiffe_id == spiffe_id)
            and (parent_id is None or entry.parent_id == parent_id)
            and (wanted is None or set_matches(frozenset(entry.selectors), wanted, match))
            and (domains is None or set_matches(frozenset(entry.federates_with), domains, federates_match))
            and (not hint or entry.hint == hint)
        ]

    def to_state(self) -> list[dict[str, Any]]:
        """Entries for the state file."""
        return [entry_to_state(entry) for entry in self.all()]

    def load_state(self, state: list[dict[str, Any]]) -> None:
        """Restore entries saved by :meth:`to_state` (no change notification)."""
        for item in state:
            entry = entry_from_state(item)
            self._entries[entry.id] = entry


def set_matches(candidate: frozenset[T], wanted: frozenset[T], match: SelectorMatch) -> bool:
    """SPIRE's MatchBehavior of a filter set against an entry's set."""
    if match is SelectorMatch.EXACT:
        return candidate == wanted
    if match is SelectorMatch.SUBSET:
        return bool(candidate) and candidate <= wanted
    if match is SelectorMatch.SUPERSET:
        return candidate >= wanted
    return bool(candidate & wanted)


def selector_problem(selector: Selector) -> str | None:
    """SPIRE's checks on one selector."""
    if not selector.type:
        return "missing selector type"
    if ":" in selector.type:
        return "selector type contains ':'"
    if not selector.value:
        return "missing selector value"
    return None


def entry_to_state(entry: RegistrationEntry) -> dict[str, Any]:
    """An entry as JSON-ready data."""
    return {
        "id": entry.id,
        "spiffe_id": str(entry.spiffe_id),
        "parent_id": str(entry.parent_id),
        "selectors": [str(s) for s in entry.selectors],
        "x509_svid_ttl": entry.x509_svid_ttl,
        "federates_with": [td.name for td in entry.federates_with],
        "hint": entry.hint,
        "admin": entry.admin,
        "downstream": entry.downstream,
        "dns_names": list(entry.dns_names),
        "created_at": entry.created_at,
    }


def entry_from_state(item: dict[str, Any]) -> RegistrationEntry:
    """Inverse of :func:`entry_to_state`."""
    return RegistrationEntry(
        spiffe_id=SpiffeId.parse(item["spiffe_id"]),
        parent_id=SpiffeId.parse(item["parent_id"]),
        selectors=tuple(Selector.parse(s) for s in item["selectors"]),
        x509_svid_ttl=item["x509_svid_ttl"],
        federates_with=tuple(TrustDomain.parse(td) for td in item["federates_with"]),
        hint=item["hint"],
        admin=item["admin"],
        downstream=item["downstream"],
        dns_names=tuple(item["dns_names"]),
        id=item["id"],
        created_at=item["created_at"],
    )


# ---------------------------------------------------------------------------------------------- seeding


def _spiffe_id(value: str) -> str | None:
    try:
        SpiffeId.parse(value)
    except SpiffeIdError as err:
        return f"must be a SPIFFE ID ({err})"
    return None


def _selectors(value: tuple[str, ...]) -> str | None:
    for text in value:
        try:
            Selector.parse(text)
        except SpiffeIdError:
            return f'every selector must look like "type:value", {text!r} does not'
    return None


def _domains(value: tuple[str, ...]) -> str | None:
    for text in value:
        try:
            TrustDomain.parse(text)
        except SpiffeIdError as err:
            return f"every entry must be a trust domain ({err})"
    return None


@dataclass(frozen=True, slots=True)
class SeedEntry:
    """One ``[[entry]]`` of an ``--entries`` file."""

    spiffe_id: str = setting("", "the SPIFFE ID issued", check=_spiffe_id)
    node: str = setting("", "the node whose agent issues it")
    selectors: tuple[str, ...] = setting(
        (), "workload selectors, all required, e.g. unix:uid:1000", check=_selectors
    )
    ttl: int = setting(0, "X509-SVID lifetime in seconds; 0: --svid-ttl")
    federates_with: tuple[str, ...] = setting(
        (), "trust domains whose bundles the workload gets", check=_domains
    )
    hint: str = setting("", "hint for workloads holding several SVIDs")


@dataclass(frozen=True, slots=True)
class EntriesFile:
    """An ``--entries`` file."""

    entry: tuple[SeedEntry, ...] = setting((), "registration entries")


def load_seed(path: Path, trust_domain: TrustDomain) -> list[RegistrationEntry]:
    """Read an ``--entries`` TOML file; raise ConfigError listing every problem."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise ConfigError([f"{path}: cannot read entries: {err}"]) from err
    problems: list[str] = []
    seeds = decode(EntriesFile, data, problems)
    problems.extend(
        f"entry[{index}].{name}: required"
        for index, seed in enumerate(seeds.entry)
        for name in ("spiffe_id", "node", "selectors")
        if not getattr(seed, name)
    )
    if problems:
        raise ConfigError([f"{path}: {problem}" for problem in problems])
    return [
        RegistrationEntry(
            spiffe_id=SpiffeId.parse(seed.spiffe_id),
            parent_id=agent_id(trust_domain, seed.node),
            selectors=tuple(Selector.parse(s) for s in seed.selectors),
            x509_svid_ttl=seed.ttl,
            federates_with=tuple(TrustDomain.parse(td) for td in seed.federates_with),
            hint=seed.hint,
        )
        for seed in seeds.entry
    ]
