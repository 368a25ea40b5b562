"""authd's connection to its local SPIRE agent: the identity plane's streams, store and health.

:class:`IdentityPlane` owns the Workload API client (authd's own SVID), the Delegated Identity client
(local workloads' SVIDs and every bundle) and the SVID store they fill, and reports one health component,
``svids``:

* starting until the store is ready (own SVID and bundles held), which gates the daemon's READY=1;
* ready while every stream is up;
* degraded while a stream reconnects (the last good SVIDs are still served), or after SPIRE redacted
  authd's own SVID.

The composition root calls :meth:`IdentityPlane.set_workloads` whenever cluster state says which
workloads run on this node.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Iterable, Mapping

import structlog

from authd.backoff import BackoffFactory, BackoffPolicy
from authd.config.model import SpireConfig
from authd.health import Component
from authd.identity import Selector, SpiffeId
from authd.jobs import Job
from authd.spire.delegated import DelegatedIdentityClient
from authd.spire.endpoint import Endpoint, check_admin_socket, workload_endpoint
from authd.spire.workload import NodeIdentity, WorkloadApiClient
from authd.svids import SvidStore

log = structlog.get_logger(__name__)


def stream_kind(name: str) -> str:
    """A stream's name without its selectors ("delegated-svids[unix:uid:1000]" -> "delegated-svids").

    Metrics label streams by kind: selectors would make one series per workload.
    """
    return name.split("[", 1)[0]


class StreamBoard:
    """Which streams are up and why the others are not; calls ``on_change`` on every transition."""

    def __init__(self, on_change: Callable[[], None]) -> None:
        """Start with no stream known."""
        self._on_change = on_change
        self._down: dict[str, str] = {}
        self.failures: Counter[str] = Counter()
        """Failures (each followed by a reconnect, or by giving up) per stream kind, for the metrics."""

    def stream_up(self, name: str) -> None:
        """A message arrived on ``name``."""
        if self._down.pop(name, None) is not None:
            log.info("spire stream restored", stream=name)
            self._on_change()

    def stream_down(self, name: str, reason: str) -> None:
        """``name`` failed."""
        self.failures[stream_kind(name)] += 1
        if self._down.get(name) != reason:
            self._down[name] = reason
            self._on_change()

    def stream_closed(self, name: str) -> None:
        """``name`` was closed on purpose."""
        self.stream_up(name)

    @property
    def down(self) -> Mapping[str, str]:
        """Streams not up, with the reason."""
        return dict(self._down)


class IdentityPlane:
    """The SPIRE agent clients, the store they fill, and the ``svids`` health component."""

    def __init__(
        self,
        store: SvidStore,
        health: Component,
        *,
        workload: Endpoint,
        admin: Endpoint,
        node: NodeIdentity,
        backoff: BackoffFactory,
        bundle_reopen: float,
    ) -> None:
        """Build the clients; nothing connects until the jobs run."""
        self.store = store
        self._health = health
        self.board = StreamBoard(self._report)
        self._workload = WorkloadApiClient(workload, store, node=node, backoff=backoff, status=self.board)
        self._delegated = DelegatedIdentityClient(
            admin, store, backoff=backoff, status=self.board, bundle_reopen=bundle_reopen
        )

    @classmethod
    def from_config(
        cls,
        config: SpireConfig,
        health: Callable[[], Component],
        *,
        node: NodeIdentity,
        environ: Mapping[str, str] | None = None,
    ) -> IdentityPlane | None:
        """Build from ``[spire]``; None when SPIRE is disabled or no Workload API socket is known.

        ``health`` registers the component only when the plane is built, so a daemon without SPIRE
        is not kept from READY by it. Raises ConfigError for an unusable address or socket layout.
        """
        if not config.enabled:
            log.warning("SPIRE disabled by config: running without identities")
            return None
        workload = workload_endpoint(config.workload_socket, os.environ if environ is None else environ)
        if workload is None:
            log.warning("no Workload API socket configured (spire.workload_socket or SPIFFE_ENDPOINT_SOCKET)")
            return None
        check_admin_socket(workload, config.admin_socket)
        policy = BackoffPolicy(
            initial=config.reconnect_backoff_initial.total_seconds(),
            maximum=config.reconnect_backoff_max.total_seconds(),
        )
        return cls(
            SvidStore(),
            health(),
            workload=workload,
            admin=Endpoint.unix(config.admin_socket),
            node=node,
            backoff=policy,
            bundle_reopen=config.bundle_stream_reopen.total_seconds(),
        )

    def set_workloads(self, workloads: Mapping[SpiffeId, Iterable[Selector]]) -> None:
        """The workloads running on this node and their selectors; streams follow at once."""
        self._delegated.set_workloads(workloads)

    def jobs(self) -> list[Job]:
        """The named jobs the daemon runs: both API clients (critical: a refusal is permanent) and health."""
        return [
            Job("spire-workload-api", self._workload.run, critical=True),
            Job("spire-delegated-identity", self._delegated.run, critical=True),
            Job("svids-health", self._watch_store, critical=False),
        ]

    async def _watch_store(self) -> None:
        with self.store.subscribe() as events:
            self._report()
            async for _ in events:
                self._report()

    def _report(self) -> None:
        down = self.board.down
        problems = [f"{name}: {reason}" for name, reason in sorted(down.items())]
        if self.store.own_svid() is None and self.store.stats.redactions:
            problems.insert(0, "own SVID redacted by SPIRE")
        if self.store.ready and not problems:
            self._health.ready()
        elif problems:
            self._health.degraded("; ".join(problems))
