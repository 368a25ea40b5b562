from __future__ import annotations

import re

import pytest
from prometheus_client.parser import text_string_to_metric_families

from authd.daemonview import DaemonView
from authd.health import Health
from authd.histogram import Histogram
from authd.metrics import registry_for, render
from tests.fakes.ca import NOW
from tests.fakes.ca import TestCA as FakeCA
from tests.fakes.daemonview import build


@pytest.fixture
def ca() -> FakeCA:
    return FakeCA.create("example.org")


def samples(view: DaemonView) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    text = render(registry_for(view)).decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(found: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return found[(name, frozenset(labels.items()))]


def test_every_family_reads_the_components_stats(ca: FakeCA) -> None:
    view, parts = build(ca)
    found = samples(view)
    own = parts.store.own_svid()
    assert own is not None
    assert value(found, "authd_svids", kind="own") == 1
    assert value(found, "authd_svids", kind="workload") == 1
    assert value(found, "authd_svid_expiry_seconds", kind="own") == (own.not_after - NOW).total_seconds()
    assert value(found, "authd_trust_bundles") == 1
    assert value(found, "authd_spire_updates_applied_total", source="workload-api") == 1
    assert value(found, "authd_spire_streams_down", stream="delegated-svids") == 1
    assert value(found, "authd_spire_stream_failures_total", stream="delegated-svids") == 3
    assert value(found, "authd_attestations_total", result="ok") == 3
    assert value(found, "authd_attestations_total", result="not-hosted") == 2
    assert value(found, "authd_attestation_peers") == 2
    assert value(found, "authd_attestation_schedule_attempts_total", outcome="rotated-not-yet") == 1
    assert value(found, "authd_attestation_peers_attested") == 1
    assert value(found, "authd_attestations_served_total") == 7
    assert value(found, "authd_attestations_refused_total", reason="rate-limited") == 1
    assert value(found, "authd_cluster_state_info", version="abababababab") == 1
    assert value(found, "authd_cluster_state_updates_total", result="rejected") == 1
    assert value(found, "authd_auth_map_entries") == 3
    assert value(found, "authd_auth_map_capacity") == 1024
    assert value(found, "authd_auth_required_events_total", outcome="attesting") == 2
    assert value(found, "authd_datapath_verdicts_total", verdict="allowed", reason="authenticated") == 9
    assert value(found, "authd_datapath_verdicts_total", verdict="allowed", reason="no-auth-required") == 5
    assert value(found, "authd_datapath_verdicts_total", verdict="denied", reason="auth-required") == 4
    assert value(found, "authd_datapath_verdicts_total", verdict="denied", reason="auth-expired") == 0
    assert value(found, "authd_datapath_ringbuf_drops_total", type="auth-required") == 1
    assert value(found, "authd_datapath_ringbuf_drops_total", type="flow") == 0
    assert value(found, "authd_datapath_interfaces") == 2
    assert value(found, "authd_job_restarts_total", job="http") == 1
    assert value(found, "authd_component_state", component="datapath", state="degraded") == 1
    assert value(found, "authd_component_state", component="datapath", state="ready") == 0
    assert value(found, "authd_ready") == 0  # datapath was never ready


def test_values_are_read_at_scrape_time(ca: FakeCA) -> None:
    view, parts = build(ca)
    registry = registry_for(view)
    parts.attestor.results["ok"] += 10
    parts.snapshot = parts.snapshot.__class__(
        counters={"denied_auth_expired": 2},
        auth_capacity=2048,
        interfaces=(),
        events_decoded=0,
        events_malformed=3,
    )
    text = render(registry).decode()
    assert 'authd_attestations_total{result="ok"} 13.0' in text
    assert 'authd_datapath_verdicts_total{reason="auth-expired",verdict="denied"} 2.0' in text
    assert "authd_auth_map_capacity 2048.0" in text
    assert "authd_datapath_events_malformed_total 3.0" in text


def test_latency_histogram_is_cumulative(ca: FakeCA) -> None:
    view, _ = build(ca)
    found = samples(view)
    assert value(found, "authd_attestation_duration_seconds_bucket", le="0.001") == 0
    assert value(found, "authd_attestation_duration_seconds_bucket", le="0.0025") == 1
    assert value(found, "authd_attestation_duration_seconds_bucket", le="0.005") == 2
    assert value(found, "authd_attestation_duration_seconds_bucket", le="0.05") == 3
    assert value(found, "authd_attestation_duration_seconds_bucket", le="+Inf") == 3
    assert value(found, "authd_attestation_duration_seconds_count") == 3
    assert value(found, "authd_attestation_duration_seconds_sum") == pytest.approx(0.036)


def test_labels_never_carry_identities_nodes_or_addresses(ca: FakeCA) -> None:
    view, _ = build(ca)
    text = render(registry_for(view)).decode()
    labels = set(re.findall(r'="([^"]*)"', text))
    assert not {label for label in labels if "spiffe://" in label or "node-" in label or "10.0." in label}
    assert "unix:uid" not in text  # stream selectors are cut from the stream label


def test_a_daemon_without_spire_or_datapath_exports_only_what_it_has() -> None:
    health = Health()
    health.register("control").ready()
    health.changed()
    found = samples(DaemonView(node="node-a", health=health))
    names = {name for name, _ in found}
    assert value(found, "authd_ready") == 1
    assert not {
        n for n in names if n.startswith(("authd_svid", "authd_attest", "authd_datapath", "authd_auth_"))
    }


def test_histogram_bounds_and_overflow() -> None:
    histogram = Histogram((1.0, 2.0))
    for observed in (0.5, 1.0, 1.5, 9.0):
        histogram.observe(observed)
    assert histogram.cumulative() == [(1.0, 2), (2.0, 3), (float("inf"), 4)]
    assert histogram.count == 4
    assert histogram.sum == 12.0
    with pytest.raises(ValueError, match="strictly increasing"):
        Histogram((2.0, 1.0))
