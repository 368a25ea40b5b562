"""What the operator-facing surfaces (``/metrics``, ``authd status``) may read of the running daemon.

The composition root fills one :class:`DaemonView` with the components it built; the metrics collector
and the status report read their stats objects when asked, so the components carry no metric or report
code. Each source is a small protocol of exactly what is read; a daemon without SPIRE, attestation or a
datapath leaves that source out, and the surfaces say so instead of failing.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Protocol

from authd.attest.channels import ChannelStats
from authd.attest.results import PeerStatus, ResultStats
from authd.authmanager import ManagerStats
from authd.cluster.source import SourceStats
from authd.encryption.tunnel import TunnelSnapshot
from authd.health import ComponentStatus, State
from authd.identity import SpiffeId
from authd.ktls.support import KtlsStats
from authd.logbook import Entry
from authd.svids import StoreStats
from authd.x509svid import BundleSet, X509Svid

if TYPE_CHECKING:  # the datapath (and libbpf) is imported only when enabled
    from authd.datapath.enforcement import DatapathSnapshot


class HealthSource(Protocol):
    """The health registry."""

    @property
    def is_ready(self) -> bool:
        """Whether start-up is complete (every gating component was ready once)."""
        ...

    @property
    def healthy(self) -> bool:
        """Whether no component is failed."""
        ...

    def snapshot(self) -> list[ComponentStatus]:
        """Every component's status."""
        ...


class SvidSource(Protocol):
    """The SVID store."""

    @property
    def stats(self) -> StoreStats:
        """Updates applied and rejected."""
        ...

    @property
    def synced(self) -> bool:
        """Whether the local SVIDs reflect SPIRE."""
        ...

    def own_svid(self) -> X509Svid | None:
        """The own SVID of this authd."""
        ...

    def local_svids(self) -> Mapping[SpiffeId, X509Svid]:
        """The local workloads' SVIDs."""
        ...

    def bundles(self) -> BundleSet:
        """The trust bundles, one per trust domain."""
        ...


class StreamSource(Protocol):
    """The SPIRE streams' board."""

    @property
    def down(self) -> Mapping[str, str]:
        """Streams not up, with the reason."""
        ...

    @property
    def failures(self) -> Counter[str]:
        """Failures per stream kind."""
        ...


class ChannelSource(Protocol):
    """The node channels."""

    @property
    def stats(self) -> ChannelStats:
        """Channels opened, lost and refused, and proofs exchanged."""
        ...

    def sessions(self) -> dict[str, bool]:
        """Every peer node a channel is kept with, and whether it is up."""
        ...


class AttestationSource(Protocol):
    """The attestation results."""

    @property
    def stats(self) -> ResultStats:
        """Outcomes by result."""
        ...

    def peers(self) -> list[PeerStatus]:
        """Every wanted peer with its result and last failure."""
        ...


class ClusterStatsSource(Protocol):
    """The cluster-state source."""

    @property
    def stats(self) -> SourceStats:
        """Versions applied and rejected, the version in force."""
        ...


class KtlsSource(Protocol):
    """The kTLS gate."""

    @property
    def stats(self) -> KtlsStats:
        """Whether the kernel has TLS, and the kTLS rules whose pairs are denied here."""
        ...


class TunnelSource(Protocol):
    """The encryption job."""

    def snapshot(self) -> TunnelSnapshot:
        """The interface, the node key and the peers."""
        ...


def _none() -> None:
    return None


def _utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class DaemonView:
    """The running daemon's components, as the metrics and status surfaces read them."""

    node: str
    health: HealthSource
    svids: SvidSource | None = None
    streams: StreamSource | None = None
    channels: ChannelSource | None = None
    attestations: AttestationSource | None = None
    cluster: ClusterStatsSource | None = None
    ktls: KtlsSource | None = None
    tunnel: TunnelSource | None = None
    """The encryption job, with ``[encryption] mode = "wireguard"``."""
    auth: Callable[[], ManagerStats | None] = _none
    """The auth manager's stats while it runs (it runs once the datapath is loaded)."""
    fail_closed_at: Callable[[], datetime | None] = _none
    """When the auth map's first entry expires unless renewed (the auth manager's answer, while it runs)."""
    datapath: Callable[[], DatapathSnapshot | None] = _none
    """The datapath's counters and attachments while it is loaded."""
    datapath_enabled: bool = False
    restarts: Mapping[str, int] = field(default_factory=dict)
    """Restarts per job (the supervisor's counter, read live)."""
    recent: Callable[[], list[Entry]] = list
    """The logbook's recent warnings and errors."""
    now: Callable[[], datetime] = _utcnow


def ready_now(health: HealthSource) -> bool:
    """Started (every gating component was ready once) and no gating component is failed now.

    What /readyz and ``authd_ready`` say; a degraded component still serves its last good state.
    """
    failed = any(s.gates_ready and s.state is State.FAILED for s in health.snapshot())
    return health.is_ready and not failed
