"""``/metrics``: a Prometheus collector that reads the components' stats objects at scrape time.

Nothing is counted twice: every number is read from where the component already keeps it (the SVID
store's stats, the stream board, the attestation client, schedule and listener, the cluster source, the
auth manager, the datapath's per-CPU counters map), so a scrape shows the live state and components stay
free of metric code. Labels are low-cardinality only: reasons, results, stream kinds, component names;
never SPIFFE IDs, node names or addresses (``authd status`` shows those). Series that alerts read exist
from the first scrape, at 0 (``ALWAYS``); drop reasons are Hubble's names (authd.hubble.reasons), the
standard ``process_*`` metrics come from prometheus_client, and a scraper that asks for OpenMetrics
gets it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from datetime import datetime

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from authd import __version__
from authd.daemonview import DaemonView, ready_now
from authd.datapath.layout import Direction
from authd.encryption.tunnel import REFUSALS, ROTATION_RESULTS
from authd.health import State
from authd.histogram import Histogram
from authd.hubble.reasons import DROP_REASONS

# The datapath's verdict counters (enum authd_counter) as (verdict, reason) label pairs: Hubble's verdict
# names, and for drops Hubble's drop reason (so AUTH_EXPIRED counts as AUTH_REQUIRED, as in Cilium). Each
# is counted by the packet's direction too (the verdicts map), labelled INGRESS or EGRESS as Hubble's
# traffic_direction and Cilium's drop counters are.
_VERDICTS = {
    "allowed": ("FORWARDED", "NO_AUTH_REQUIRED"),
    "allowed_auth": ("FORWARDED", "AUTHENTICATED"),
    "established": ("FORWARDED", "ESTABLISHED"),
    "denied_auth_required": ("DROPPED", DROP_REASONS["AUTH_REQUIRED"].name),
    "denied_auth_expired": ("DROPPED", DROP_REASONS["AUTH_EXPIRED"].name),
    "denied_malformed": ("DROPPED", DROP_REASONS["MALFORMED"].name),
    "denied_unsupported": ("DROPPED", DROP_REASONS["UNSUPPORTED"].name),
    "denied_source_not_owned": ("DROPPED", DROP_REASONS["SOURCE_NOT_OWNED"].name),
    "denied_source_wrong_interface": ("DROPPED", DROP_REASONS["SOURCE_WRONG_INTERFACE"].name),
    "denied_destination_not_owned": ("DROPPED", DROP_REASONS["DESTINATION_NOT_OWNED"].name),
    "denied_router_message": ("DROPPED", DROP_REASONS["ROUTER_MESSAGE"].name),
    "denied_encryption_unavailable": ("DROPPED", DROP_REASONS["ENCRYPTION_UNAVAILABLE"].name),
    "denied_not_encrypted": ("DROPPED", DROP_REASONS["NOT_ENCRYPTED"].name),
}
# Label values whose series exist from the start at 0, so that rates and alerts see them at once.
ALWAYS: Mapping[str, tuple[str, ...]] = {
    "authd_attestations": ("ok",),
    "authd_auth_required_events": ("attesting", "known", "local", "unknown-identity", "waiting"),
    "authd_spire_updates_applied": ("delegated-identity-api", "workload-api"),
    "authd_spire_stream_failures": ("delegated-bundles", "delegated-svids", "workload-api"),
    "authd_wireguard_rotations": ROTATION_RESULTS,
    "authd_wireguard_keys_refused": REFUSALS,
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
        yield from self._ktls()
        yield from self._wireguard()
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
        restarts = CounterMetricFamily(  # job names are known only once one restarted
            "authd_job_restarts", "non-critical jobs restarted after a failure", labels=["job"]
        )
        for job, count in sorted(view.restarts.items()):
            restarts.add_metric([job], count)
        yield restarts

    def _ktls(self) -> Iterator[Metric]:
        gate = self._view.ktls
        if gate is None:
            return
        stats = gate.stats
        yield GaugeMetricFamily(
            "authd_ktls_kernel_support",
            '1 if the kernel has TLS (TCP_ULP "tls")',
            value=_flag(stats.kernel_tls),
        )
        yield GaugeMetricFamily(
            "authd_ktls_denied_rules",
            "encrypt = ktls rules this node enforces, whose pairs it denies (it cannot carry them in kTLS)",
            value=stats.denied_rules,
        )

    def _wireguard(self) -> Iterator[Metric]:
        """Per-peer numbers as the oldest or the sum: node names are never labels (``authd status`` has them).

        The byte counters sum the current peers: a peer removed takes its bytes along (a counter reset).
        """
        tunnel = self._view.tunnel
        if tunnel is None:
            return
        snap = tunnel.snapshot()
        backend = GaugeMetricFamily(
            "authd_wireguard_backend",
            "the WireGuard backend in use (1), once the interface is up",
            labels=["backend"],
        )
        if snap.backend is not None:
            backend.add_metric([snap.backend], 1)
        yield backend
        yield GaugeMetricFamily("authd_wireguard_peers", "WireGuard peers configured", value=len(snap.peers))
        yield GaugeMetricFamily(
            "authd_wireguard_nodes_without_peer",
            "remote nodes in cluster state with no WireGuard peer (no keys from their channel yet)",
            value=len(snap.without_peer),
        )
        if snap.public_key is not None:
            yield GaugeMetricFamily(
                "authd_wireguard_key_age_seconds",
                "age of this node's WireGuard key",
                value=snap.at - snap.key_since,
            )
        devices = [peer.device for peer in snap.peers if peer.device is not None]
        handshakes = [d.last_handshake for d in devices if d.last_handshake is not None]
        if handshakes:
            yield GaugeMetricFamily(
                "authd_wireguard_handshake_age_max_seconds",
                "seconds since the handshake of the peer that handshook longest ago",
                value=snap.at - min(handshakes),
            )
        yield GaugeMetricFamily(
            "authd_wireguard_peers_without_handshake",
            "peers with no completed handshake",
            value=len(snap.peers) - len(handshakes),
        )
        learned = [peer.key_since for peer in snap.peers if peer.key_since is not None]
        if learned:
            yield GaugeMetricFamily(
                "authd_wireguard_peer_key_age_max_seconds",
                "age of the oldest peer key in use (since it was first learned)",
                value=snap.at - min(learned),
            )
        for name, doc, total in (
            (
                "authd_wireguard_received_bytes",
                "bytes received from the current peers",
                sum(d.rx_bytes for d in devices),
            ),
            (
                "authd_wireguard_sent_bytes",
                "bytes sent to the current peers",
                sum(d.tx_bytes for d in devices),
            ),
        ):
            yield CounterMetricFamily(name, doc, value=total)
        yield _labelled(
            "authd_wireguard_rotations",
            "rotations of this node's WireGuard key, by result",
            "result",
            snap.stats.rotations,
        )
        yield _labelled(
            "authd_wireguard_keys_refused",
            "WireGuard keys from peers refused or dropped, by reason",
            "reason",
            snap.stats.refused,
        )

    def _svids(self) -> Iterator[Metric]:
        store = self._view.svids
        if store is None:
            return
        own = store.own_svid()
        local = list(store.local_svids().values())
        held = GaugeMetricFamily("authd_svids", "X509-SVIDs held, by kind", labels=["kind"])
        held.add_metric(["own"], 1 if own is not None else 0)
        held.add_metric(["workload"], len(local))
        yield held
        expiry = GaugeMetricFamily(
            "authd_svid_expiry_timestamp_seconds",
            "when the soonest-expiring SVID of each kind expires, as a Unix time (absent when none is held)",
            labels=["kind"],
        )
        if own is not None:
            expiry.add_metric(["own"], own.not_after.timestamp())
        if local:
            expiry.add_metric(["workload"], min(svid.not_after for svid in local).timestamp())
        yield expiry
        yield GaugeMetricFamily(
            "authd_trust_bundles",
            "trust bundles held (one per trust domain)",
            value=len(store.bundles().bundles),
        )
        stats = store.stats
        yield _labelled(
            "authd_spire_updates_applied", "SPIRE updates applied, by source", "source", stats.applied
        )
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
        yield _labelled(
            "authd_spire_stream_failures",
            "SPIRE stream failures, each followed by a reconnect",
            "stream",
            board.failures,
        )

    def _attestation(self) -> Iterator[Metric]:
        view = self._view
        if view.attestations is not None:
            yield _labelled(
                "authd_attestations",
                "outcomes of identity proofs from other nodes: ok, rotated, repeated, or the failure reason",
                "result",
                view.attestations.stats.attempts,
            )
            peers = view.attestations.peers()
            yield GaugeMetricFamily(
                "authd_attestation_peers", "remote (identity, node) pairs wanted", value=len(peers)
            )
            yield GaugeMetricFamily(
                "authd_attestation_peers_attested",
                "wanted peers with a valid attestation",
                value=sum(1 for p in peers if p.result is not None),
            )
        if view.channels is not None:
            stats = view.channels.stats
            sessions = view.channels.sessions()
            yield GaugeMetricFamily(
                "authd_channels", "peer nodes a channel is kept with", value=len(sessions)
            )
            yield GaugeMetricFamily(
                "authd_channels_up", "channels established now", value=sum(sessions.values())
            )
            opened = CounterMetricFamily(
                "authd_channels_opened", "channel sessions established, by side", labels=["side"]
            )
            for side, count in sorted(stats.opened.items()):
                opened.add_metric([side], count)
            yield opened
            for name, doc, counts in (
                ("authd_channels_lost", "channels dialed that failed or ended, by reason", stats.ended),
                ("authd_channels_refused", "incoming channels refused or ended, by reason", stats.refused),
            ):
                family = CounterMetricFamily(name, doc, labels=["reason"])
                for reason, count in sorted(counts.items()):
                    family.add_metric([reason], count)
                yield family
            yield CounterMetricFamily(
                "authd_channel_proofs_sent",
                "identity proofs sent to other nodes",
                value=stats.exchanged.proofs_sent,
            )
            yield _histogram(
                "authd_attestation_duration_seconds",
                "time from asking a node for an identity to its verified proof",
                stats.exchanged.proof_latency,
            )

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
            ("held", stats.holds),
        ):
            updates.add_metric([result], count)
        yield updates
        held = GaugeMetricFamily(
            "authd_cluster_state_held",
            "1 while a valid state is held back as a likely bad deploy until `authd cluster accept`",
            labels=["version", "reason"],
        )
        held.add_metric([stats.held_version[:12], stats.held_reason], 1 if stats.held_version else 0)
        yield held
        since = stats.out_of_touch_since
        yield GaugeMetricFamily(
            "authd_cluster_state_age_seconds",
            "how long the source has been out of touch with its store (etcd), so the state possibly stale",
            value=max(0.0, self._view.now().timestamp() - since) if since is not None else 0.0,
        )

    def _auth(self) -> Iterator[Metric]:
        stats = self._view.auth()
        if stats is None:
            return
        yield GaugeMetricFamily("authd_auth_map_entries", "entries in the auth map", value=stats.entries)
        fail_closed = self._view.fail_closed_at()
        if fail_closed is not None:
            yield GaugeMetricFamily(
                "authd_fail_closed_in_seconds",
                "seconds until the first auth entry expires unless SPIRE renews it: during a SPIRE outage,"
                " when traffic starts being denied (absent while the map holds no entry)",
                value=max(_seconds_until(fail_closed, self._view.now()), 0.0),
            )
        yield CounterMetricFamily(
            "authd_auth_reconciles", "reconciles of the datapath maps", value=stats.reconciles
        )
        writes = CounterMetricFamily(
            "authd_auth_map_writes", "auth map entries written, by op", labels=["op"]
        )
        writes.add_metric(["upsert"], stats.upserts)
        writes.add_metric(["delete"], stats.deletes)
        yield writes
        yield _labelled(
            "authd_auth_required_events",
            "auth-required events from the datapath, by what was done",
            "outcome",
            stats.auth_required,
        )

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
        mode = GaugeMetricFamily(
            "authd_datapath_attach_mode", "how programs are attached (1: the mode in use)", labels=["mode"]
        )
        mode.add_metric([snapshot.attach_mode], 1)
        yield mode
        ahead = GaugeMetricFamily(
            "authd_datapath_programs_ahead",
            "foreign programs that run before authd's on an attached interface (any: degraded)",
            labels=["interface"],
        )
        for interface, programs in sorted(snapshot.ahead.items()):
            ahead.add_metric([interface], len(programs))
        yield ahead
        yield CounterMetricFamily(
            "authd_datapath_reassertions",
            "times authd put its tcx links first again after another program got ahead",
            value=snapshot.reassertions,
        )
        counters = snapshot.counters
        verdicts = CounterMetricFamily(
            "authd_datapath_verdicts",
            "policy verdicts on packets, by Hubble's verdict, drop reason and traffic direction",
            labels=["verdict", "reason", "direction"],
        )
        totals: Counter[tuple[str, str, str]] = Counter()
        for counter, (verdict, reason) in _VERDICTS.items():
            for direction in Direction:
                count = snapshot.verdicts.get((counter, direction), 0)
                totals[verdict, reason, direction.name] += count
        for labels, count in totals.items():
            verdicts.add_metric(labels, count)
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


def _labelled(name: str, documentation: str, label: str, counts: Mapping[str, int]) -> CounterMetricFamily:
    """A counter family with one label: every counted value, and the ALWAYS values at 0 if not counted."""
    family = CounterMetricFamily(name, documentation, labels=[label])
    values: Iterable[str] = sorted({*counts, *ALWAYS.get(name, ())})
    for value in values:
        family.add_metric([value], counts.get(value, 0))
    return family


def _histogram(name: str, documentation: str, histogram: Histogram) -> HistogramMetricFamily:
    buckets = [(_bound(bound), count) for bound, count in histogram.cumulative()]
    return HistogramMetricFamily(name, documentation, buckets=buckets, sum_value=histogram.sum)


def _bound(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)


def registry_for(view: DaemonView) -> CollectorRegistry:
    """A registry with authd's collector and the process collector (never the process-wide default)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(AuthdCollector(view))
    ProcessCollector(registry=registry)
    return registry


def render(registry: CollectorRegistry, accept: str = "") -> tuple[bytes, str]:
    """The exposition of ``registry`` and its content type: OpenMetrics if ``accept`` asks for it."""
    encoder, content_type = choose_encoder(accept)
    return encoder(registry), content_type
