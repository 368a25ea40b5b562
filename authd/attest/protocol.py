"""What crosses the wire after the handshake, and what both sides need from the rest of authd."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from authd.identity import SpiffeId
from authd.x509svid import BundleSet, X509Svid

# The listener writes this line once it has verified the client. TLS 1.3 completes the client's side of
# the handshake before the server has checked the client certificate, so without it a client could not
# tell an accepted attestation from a refused one.
ACCEPTED = b"authd-attest/1 ok\n"


class LocalIdentities(Protocol):
    """The SVIDs this node holds and the bundles it trusts (the SVID store)."""

    def own_svid(self) -> X509Svid | None:
        """The node SVID this authd runs as, if held."""
        ...

    def local_svids(self) -> Mapping[SpiffeId, X509Svid]:
        """SVIDs of the workloads hosted on this node, by SPIFFE ID."""
        ...

    def svid_for(self, spiffe_id: SpiffeId) -> X509Svid | None:
        """The SVID of one workload hosted on this node, if held."""
        ...

    def bundles(self) -> BundleSet:
        """Trust bundles by trust domain."""
        ...
