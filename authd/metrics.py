"""``/metrics``: a Prometheus collector that reads the components' stats objects at scrape time.

Nothing is counted twice: every number is read from where the component already keeps it (the SVID
store's stats, the stream board, the attestation client, schedule and listener, the cluster source, the
auth manager, the datapath's per-CPU counters map), so a scrape shows the live state and components stay
free of metric code. Labels are low-cardinality only: reasons, results, stream kinds, component names;
never SPIFFE IDs, node names or addresses (``authd status`` shows those).
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from authd import __version__
from authd.daemonview import DaemonView, ready_now
from authd.health import State
from authd.histogram import Histogram

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# The datapath's verdict counters (enum authd_counter) as (verdict, reason) label pairs.
_VERDICTS = {
    "allowed": ("allowed", "no-auth-required"),
    "allowed_auth": ("allowed", "authenticated"),
    "denied_auth_required": ("denied", "auth-required"),
    "denied_auth_expired": ("denied", "auth-expired"),
    "denied_malformed": ("denied", "malformed"),
    "denied_unsupported": ("denied", "unsupported-protocol"),
    "denied_source_not_owned": ("denied", "source-not-owned"),
    "denied_source_wrong_interface": ("denied", "source-wrong-interface"),
    "denied_destination_not_owned": ("denied", "destination-not-owned"),
    "established": ("allowed", "established-flow"),
}
_SKIPPED = {"neighbor": "neighbor-discovery"}


class AuthdCollector(Collector):
    """Builds every authd metric from a :class:`~authd.daemonview.DaemonView` when scraped."""

    def __init__(self, view: DaemonView) -> None:
        """Read from ``view``'s sources on every scrape."""
        self._view = view

    def collect(self) -> Iterator[Metric]:
        """Yield the metric families (called by the registry on each scrape)."""
        yield InfoMetricFamily("authd_build", "authd's version", value={"version": __version__})
        yield from self._health()
        yield from self._svids()
        yield from self._spire()
        yield from self._attestation()
        yield from self._cluster()
        yield from self._auth()
        yield from self._datapath()

    def describe(self) -> Iterator[Metric]:
        """Nothing up front: the registry then calls :meth:`collect` only when scraped."""
        return iter(())

    # --------------------------------------------------------------------------------- families

    def _health(self) -> Iterator[Metric]:
        view = self._view
        yield GaugeMetricFamily(
            "authd_ready",
            "1 while ready, as /readyz answers 200",
            value=_flag(ready_now(view.health)),
        )
        yield GaugeMetricFamily(
            "authd_healthy", "1 while no component has failed", value=_flag(view.health.healthy)
        )
        states = GaugeMetricFamily(
            "authd_component_state", "1 for each component's current state", labels=["component", "state"]
        )
        for status in view.health.snapshot():
            for state in State:
                states.add_metric([status.name, state.value], _flag(status.state is state))
        yield states
        restarts = CounterMetricFamily(
            "authd_job_restarts", "non-critical jobs restarted after a failure", labels=["job"]
        )
        for job, count in sorted(view.restarts.items()):
            restarts.add_metric([job], count)
        yield restarts

    def _svids(self) -> Iterator[Metric]:
        store = self._view.svids
        if store is None:
            return
        now = self._view.now()
        own = store.own_svid()
        local = list(store.local_svids().values())
        held = GaugeMetricFamily("authd_svids", "X509-SVIDs held, by kind", labels=["kind"])
        held.add_metric(["own"], 1 if own is not None else 0)
        held.add_metric(["workload"], len(local))
        yield held
        expiry = GaugeMetricFamily(
            "authd_svid_expiry_seconds",
            "seconds until the soonest-expiring SVID of each kind expires (absent when none is held)",
            labels=["kind"],
        )
        if own is not None:
            expiry.add_metric(["own"], _seconds_until(own.not_after, now))
        if local:
            expiry.add_metric(["workload"], min(_seconds_until(svid.not_after, now) for svid in local))
        yield expiry
        yield GaugeMetricFamily(
            "authd_trust_bundles",
            "trust bundles held (one per trust domain)",
            value=len(store.bundles().bundles),
        )
        stats = store.stats
        applied = CounterMetricFamily(
            "authd_spire_updates_applied", "SPIRE updates applied, by source", labels=["source"]
        )
        for source, count in sorted(stats.applied.items()):
            applied.add_metric([source], count)
        yield applied
        rejected = CounterMetricFamily(
            "authd_spire_updates_rejected",
            "SPIRE updates refused (last good state kept)",
            labels=["source", "rule"],
        )
        for (source, rule), count in sorted(stats.rejected.items()):
            rejected.add_metric([source, rule], count)
        yield rejected
        yield CounterMetricFamily(
            "authd_spire_svid_redactions", "own SVID redacted by SPIRE", value=stats.redactions
        )
        yield GaugeMetricFamily(
            "authd_spire_synced", "1 once every workload stream answered", value=_flag(store.synced)
        )

    def _spire(self) -> Iterator[Metric]:
        board = self._view.streams
        if board is None:
            return
        down = GaugeMetricFamily(
            "authd_spire_streams_down", "SPIRE streams not up, by kind", labels=["stream"]
        )
        kinds: dict[str, int] = {}
        for name in board.down:
            kind = name.split("[", 1)[0]
            kinds[kind] = kinds.get(kind, 0) + 1
        for kind, count in sorted(kinds.items()):
            down.add_metric([kind], count)
        yield down
        failures = CounterMetricFamily(
            "authd_spire_stream_failures",
            "SPIRE stream failures, each followed by a reconnect",
            labels=["stream"],
        )
        for kind, count in sorted(board.failures.items()):
            failures.add_metric([kind], count)
        yield failures

    def _attestation(self) -> Iterator[Metric]:
        view = self._view
        if view.attestor is not None:
            stats = view.attestor.stats
            attempts = CounterMetricFamily(
                "authd_attestations",
                "attestations this node ran, by result (ok or the failure reason)",
                labels=["result"],
            )
            for result, count in sorted(stats.results.items()):
                attempts.add_metric([result], count)
            yield attempts
            yield _histogram(
                "authd_attestation_duration_seconds", "time to a successful attestation", stats.latency
            )
        if view.attestations is not None:
            outcomes = CounterMetricFamily(
                "authd_attestation_schedule_attempts",
                "scheduled attestations by outcome: ok, rotated-not-yet (the peer still shows the old SVID "
                "past its renewal point) or the failure reason",
                labels=["outcome"],
            )
            for outcome, count in sorted(view.attestations.stats.attempts.items()):
                outcomes.add_metric([outcome], count)
            yield outcomes
            peers = view.attestations.peers()
            yield GaugeMetricFamily(
                "authd_attestation_peers", "remote (identity, node) pairs wanted", value=len(peers)
            )
            yield GaugeMetricFamily(
                "authd_attestation_peers_attested",
                "wanted peers with a valid attestation",
                value=sum(1 for p in peers if p.result is not None),
            )
        if view.listener is not None:
            listener = view.listener.stats
            yield CounterMetricFamily(
                "authd_attestations_served", "attestations served to other nodes", value=listener.served
            )
            refused = CounterMetricFamily(
                "authd_attestations_refused", "attestation handshakes refused, by reason", labels=["reason"]
            )
            for reason, count in sorted(listener.refused.items()):
                refused.add_metric([reason], count)
            yield refused

    def _cluster(self) -> Iterator[Metric]:
        source = self._view.cluster
        if source is None:
            return
        stats = source.stats
        yield InfoMetricFamily(
            "authd_cluster_state", "the cluster state version in force", value={"version": stats.version[:12]}
        )
        updates = CounterMetricFamily(
            "authd_cluster_state_updates", "cluster state versions seen, by result", labels=["result"]
        )
        for result, count in (
            ("applied", stats.applied),
            ("unchanged", stats.unchanged),
            ("rejected", stats.rejected),
            ("read-error", stats.read_errors),
        ):
            updates.add_metric([result], count)
        yield updates

    def _auth(self) -> Iterator[Metric]:
        stats = self._view.auth()
        if stats is None:
            return
        yield GaugeMetricFamily("authd_auth_map_entries", "entries in the auth map", value=stats.entries)
        yield CounterMetricFamily(
            "authd_auth_reconciles", "reconciles of the datapath maps", value=stats.reconciles
        )
        writes = CounterMetricFamily(
            "authd_auth_map_writes", "auth map entries written, by op", labels=["op"]
        )
        writes.add_metric(["upsert"], stats.upserts)
        writes.add_metric(["delete"], stats.deletes)
        yield writes
        required = CounterMetricFamily(
            "authd_auth_required_events",
            "auth-required events from the datapath, by what was done",
            labels=["outcome"],
        )
        for outcome, count in sorted(stats.auth_required.items()):
            required.add_metric([outcome], count)
        yield required

    def _datapath(self) -> Iterator[Metric]:
        snapshot = self._view.datapath()
        if snapshot is None:
            return
        yield GaugeMetricFamily(
            "authd_auth_map_capacity", "the auth map's size", value=snapshot.auth_capacity
        )
        yield GaugeMetricFamily(
            "authd_datapath_interfaces",
            "interfaces the programs are attached to",
            value=len(snapshot.interfaces),
        )
        counters = snapshot.counters
        verdicts = CounterMetricFamily(
            "authd_datapath_verdicts",
            "policy verdicts on packets, by verdict and reason",
            labels=["verdict", "reason"],
        )
        for counter, (verdict, reason) in _VERDICTS.items():
            verdicts.add_metric([verdict, reason], counters.get(counter, 0))
        yield verdicts
        skipped = CounterMetricFamily(
            "authd_datapath_packets_skipped", "packets not subject to policy, by reason", labels=["reason"]
        )
        for counter, reason in _SKIPPED.items():
            skipped.add_metric([reason], counters.get(counter, 0))
        yield skipped
        events = CounterMetricFamily(
            "authd_datapath_events", "events written to the ring buffers", labels=["type"]
        )
        events.add_metric(["auth-required"], counters.get("auth_events", 0))
        events.add_metric(["flow"], counters.get("flow_events", 0))
        yield events
        yield CounterMetricFamily(
            "authd_datapath_auth_events_suppressed",
            "auth-required events held back by the per-pair rate limit",
            value=counters.get("auth_events_suppressed", 0),
        )
        lost = CounterMetricFamily(
            "authd_datapath_ringbuf_drops",
            "events lost because their ring buffer was full, by event type",
            labels=["type"],
        )
        lost.add_metric(["auth-required"], counters.get("auth_events_lost", 0))
        lost.add_metric(["flow"], counters.get("flow_events_lost", 0))
        yield lost
        yield CounterMetricFamily(
            "authd_datapath_events_malformed",
            "ring-buffer records that did not decode",
            value=snapshot.events_malformed,
        )


def _flag(value: bool) -> int:  # noqa: FBT001 - a value, not a mode
    return 1 if value else 0


def _seconds_until(moment: datetime, now: datetime) -> float:
    return (moment - now).total_seconds()


def _histogram(name: str, documentation: str, histogram: Histogram) -> HistogramMetricFamily:
    buckets = [(_bound(bound), count) for bound, count in histogram.cumulative()]
    return HistogramMetricFamily(name, documentation, buckets=buckets, sum_value=histogram.sum)


def _bound(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)


def registry_for(view: DaemonView) -> CollectorRegistry:
    """A registry holding only authd's collector (never the process-wide default registry)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(AuthdCollector(view))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    """The text exposition of every metric in ``registry``."""
    return generate_latest(registry)
