"""A hand-written stand-in for the SVID store, as the attestation code sees it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from authd.identity import SpiffeId
from authd.x509svid import BundleSet, X509Svid


@dataclass
class FakeIdentities:
    """Holds an own SVID, local workload SVIDs and bundles that tests set directly."""

    own: X509Svid | None
    local: dict[SpiffeId, X509Svid] = field(default_factory=dict)
    trusted: BundleSet = field(default_factory=lambda: BundleSet({}))
    synced: bool = True

    def own_svid(self) -> X509Svid | None:
        return self.own

    def local_svids(self) -> Mapping[SpiffeId, X509Svid]:
        return self.local

    def svid_for(self, spiffe_id: SpiffeId) -> X509Svid | None:
        return self.local.get(spiffe_id)

    def bundles(self) -> BundleSet:
        return self.trusted

    def host(self, svid: X509Svid) -> None:
        self.local[svid.spiffe_id] = svid
