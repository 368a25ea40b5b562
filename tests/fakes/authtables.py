"""In-memory stand-ins for the pinned maps and the SVID store, as the auth manager sees them."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from datetime import datetime

from authd.cluster.desired import AuthPair
from authd.cluster.model import IpNetwork
from authd.datapath import AuthType, IpcacheEntry, PolicyKey
from authd.identity import SpiffeId
from authd.x509svid import X509Svid


@dataclass
class FakeAuthTable:
    """The auth map as a dict; ``writes`` records each batch, ``reads`` counts whole-map reads."""

    entries: dict[AuthPair, datetime] = field(default_factory=dict)
    writes: list[tuple[dict[AuthPair, datetime], list[AuthPair]]] = field(default_factory=list)
    reads: int = 0

    def read(self) -> dict[AuthPair, datetime]:
        self.reads += 1
        return dict(self.entries)

    def purge_unresolved(self) -> int:
        return 0  # the fake holds pairs only: nothing unresolvable can be in it

    def write(self, upserts: Mapping[AuthPair, datetime], deletes: Collection[AuthPair]) -> None:
        self.writes.append((dict(upserts), list(deletes)))
        for pair in deletes:
            self.entries.pop(pair, None)
        self.entries.update(upserts)


@dataclass
class FakeTables:
    """The ipcache and policy maps as dicts."""

    ipcache: dict[IpNetwork, IpcacheEntry] = field(default_factory=dict)
    policy: dict[PolicyKey, AuthType] = field(default_factory=dict)

    def sync_ipcache(self, desired: Mapping[IpNetwork, IpcacheEntry]) -> int:
        changed = len(set(self.ipcache.items()) ^ set(desired.items()))
        self.ipcache = dict(desired)
        return changed

    def sync_policy(self, desired: Mapping[PolicyKey, AuthType]) -> int:
        changed = len(set(self.policy.items()) ^ set(desired.items()))
        self.policy = dict(desired)
        return changed


@dataclass
class FakeSvids:
    """Local workload SVIDs set by the test, and whether the store counts as synced."""

    local: dict[SpiffeId, X509Svid] = field(default_factory=dict)
    synced: bool = True

    def local_svids(self) -> Mapping[SpiffeId, X509Svid]:
        return self.local
