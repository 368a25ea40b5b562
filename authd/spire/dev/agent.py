"""One dev-spire agent: the SVIDs of its node's entries, rotated at half-life, and who gets which.

An agent issues only entries parented to it (``spiffe://<td>/spire/agent/<node>``). It keeps one SVID
per entry and replaces it when the remaining lifetime drops to a jittered half-life (SPIRE's
``rotationutil``: half of the lifetime, +-10%), measured from issuance so short test TTLs behave.
Every change (rotation, entry added or removed, bundle change) bumps the agent's :class:`ChangeFeed`;
open streams recompute what their caller sees and send it if it changed.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import structlog

from authd.identity import Selector, SpiffeId, TrustDomain
from authd.spire.dev.ca import CertificateAuthority
from authd.spire.dev.registry import agent_id
from authd.spire.entries import RegistrationEntry
from authd.x509svid import X509Bundle, X509Svid

log = structlog.get_logger(__name__)

ROTATION_JITTER = 0.1


class ChangeFeed:
    """A version number and a way to wait for it to move; many waiters, no queue to overflow."""

    def __init__(self) -> None:
        """Start at version 0."""
        self.version = 0
        self._moved = asyncio.Event()

    def publish(self) -> None:
        """Announce a change to every waiter."""
        self.version += 1
        moved, self._moved = self._moved, asyncio.Event()
        moved.set()

    async def wait_beyond(self, version: int) -> None:
        """Return once the version is past ``version``."""
        while self.version <= version:
            await self._moved.wait()


@dataclass(frozen=True, slots=True)
class Issued:
    """An entry and the SVID currently issued for it."""

    entry: RegistrationEntry
    svid: X509Svid
    rotate_at: dt.datetime


class DevAgent:
    """The SVID cache of one node's agent."""

    def __init__(
        self,
        node: str,
        trust_domain: TrustDomain,
        *,
        default_ttl: dt.timedelta,
        authorized_delegates: Iterable[SpiffeId],
        rng: random.Random | None = None,
    ) -> None:
        """Empty until the first :meth:`sync`."""
        self.node = node
        self.trust_domain = trust_domain
        self.id = agent_id(trust_domain, node)
        self.authorized_delegates = frozenset(authorized_delegates)
        self.feed = ChangeFeed()
        self._default_ttl = default_ttl
        self._rng = rng or random.Random()  # noqa: S311 - rotation jitter, not cryptography
        self._issued: dict[str, Issued] = {}
        self._bundles: dict[TrustDomain, X509Bundle] = {}

    def sync(
        self,
        entries: Iterable[RegistrationEntry],
        ca: CertificateAuthority,
        bundles: Mapping[TrustDomain, X509Bundle],
        now: dt.datetime,
    ) -> None:
        """Bring the cache in line with the entries, rotations due at ``now`` and the bundles."""
        changed = False
        wanted = {entry.id: entry for entry in entries}
        for entry_id in self._issued.keys() - wanted.keys():
            log.info(
                "entry removed, SVID dropped",
                node=self.node,
                spiffe_id=str(self._issued[entry_id].entry.spiffe_id),
            )
            del self._issued[entry_id]
            changed = True
        for entry in wanted.values():
            current = self._issued.get(entry.id)
            if current is None or current.entry != entry or now >= current.rotate_at:
                self._issued[entry.id] = self._issue(entry, ca, now)
                changed = True
        if {td: b.der() for td, b in bundles.items()} != {td: b.der() for td, b in self._bundles.items()}:
            self._bundles = dict(bundles)
            changed = True
        if changed:
            self.feed.publish()

    def _issue(self, entry: RegistrationEntry, ca: CertificateAuthority, now: dt.datetime) -> Issued:
        ttl = dt.timedelta(seconds=entry.x509_svid_ttl) if entry.x509_svid_ttl else self._default_ttl
        svid = ca.mint(entry.spiffe_id, ttl, now, entry.dns_names)
        half_life = (svid.not_after - now) / 2
        jitter = 1 + ROTATION_JITTER * (2 * self._rng.random() - 1)
        rotate_at = svid.not_after - half_life * jitter
        log.debug(
            "SVID issued",
            node=self.node,
            spiffe_id=str(entry.spiffe_id),
            not_after=svid.not_after.isoformat(),
            rotate_at=rotate_at.isoformat(),
        )
        return Issued(entry, svid, rotate_at)

    def next_rotation(self) -> dt.datetime | None:
        """When the next SVID is due for rotation."""
        return min((issued.rotate_at for issued in self._issued.values()), default=None)

    def identities(self, selectors: frozenset[Selector]) -> list[Issued]:
        """What a workload with these selectors is entitled to: entries whose selectors it all has.

        Sorted by entry ID; of several entries with the same non-empty hint, only the oldest counts.
        """
        matching = [
            self._issued[entry_id]
            for entry_id in sorted(self._issued)
            if frozenset(self._issued[entry_id].entry.selectors) <= selectors
        ]
        oldest_by_hint: dict[str, Issued] = {}
        for issued in matching:
            hint = issued.entry.hint
            if hint:
                kept = oldest_by_hint.get(hint)
                if kept is None or (issued.entry.created_at, issued.entry.id) < (
                    kept.entry.created_at,
                    kept.entry.id,
                ):
                    oldest_by_hint[hint] = issued
        return [i for i in matching if not i.entry.hint or oldest_by_hint[i.entry.hint] is i]

    def bundle(self, trust_domain: TrustDomain) -> X509Bundle | None:
        """The bundle this agent holds for ``trust_domain``."""
        return self._bundles.get(trust_domain)

    def bundles(self) -> Mapping[TrustDomain, X509Bundle]:
        """Every bundle this agent holds: its own trust domain's and the federated ones."""
        return dict(self._bundles)

    def federated_bundles(self, identities: Iterable[Issued]) -> dict[TrustDomain, X509Bundle]:
        """The bundles of the trust domains these identities' entries federate with."""
        wanted = {td for issued in identities for td in issued.entry.federates_with}
        return {td: self._bundles[td] for td in sorted(wanted) if td in self._bundles}
