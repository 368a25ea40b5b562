from __future__ import annotations

import re

import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families
from prometheus_client.parser import text_string_to_metric_families

from authd.daemonview import DaemonView
from authd.datapath.layout import Direction
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
    body, content_type = render(registry_for(view))
    assert content_type.startswith("text/plain; version=0.0.4")
    text = body.decode()
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
    assert value(found, "authd_svid_expiry_timestamp_seconds", kind="own") == own.not_after.timestamp()
    assert own.not_after > NOW
    assert value(found, "authd_trust_bundles") == 1
    assert value(found, "authd_spire_updates_applied_total", source="workload-api") == 1
    assert value(found, "authd_spire_streams_down", stream="delegated-svids") == 1
    assert value(found, "authd_spire_stream_failures_total", stream="delegated-svids") == 3
    assert value(found, "authd_attestations_total", result="ok") == 3
    assert value(found, "authd_attestations_total", result="not-hosted") == 2
    assert value(found, "authd_attestations_total", result="rotated") == 1
    assert value(found, "authd_attestation_peers") == 2
    assert value(found, "authd_attestation_peers_attested") == 1
    assert value(found, "authd_channels") == 2
    assert value(found, "authd_channels_up") == 1
    assert value(found, "authd_channels_opened_total", side="dialed") == 1
    assert value(found, "authd_channels_refused_total", reason="not-a-node") == 1
    assert value(found, "authd_channel_proofs_sent_total") == 7
    assert value(found, "authd_cluster_state_info", version="abababababab") == 1
    assert value(found, "authd_cluster_state_updates_total", result="rejected") == 1
    assert value(found, "authd_auth_map_entries") == 3
    assert value(found, "authd_auth_map_capacity") == 1024
    assert value(found, "authd_fail_closed_in_seconds") == 90
    assert value(found, "authd_auth_required_events_total", outcome="attesting") == 2
    verdicts = "authd_datapath_verdicts_total"
    assert value(found, verdicts, verdict="FORWARDED", reason="AUTHENTICATED", direction="INGRESS") == 9
    assert value(found, verdicts, verdict="FORWARDED", reason="AUTHENTICATED", direction="EGRESS") == 0
    assert value(found, verdicts, verdict="FORWARDED", reason="NO_AUTH_REQUIRED", direction="EGRESS") == 5
    assert value(found, verdicts, verdict="DROPPED", reason="AUTH_REQUIRED", direction="INGRESS") == 3
    assert value(found, verdicts, verdict="DROPPED", reason="AUTH_REQUIRED", direction="EGRESS") == 1
    for direction in ("INGRESS", "EGRESS"):
        assert (
            value(found, verdicts, verdict="DROPPED", reason="INVALID_PACKET_DROPPED", direction=direction)
            == 0
        )
    assert value(found, verdicts, verdict="DROPPED", reason="UNENCRYPTED_TRAFFIC", direction="INGRESS") == 6
    # Series alerts read exist before their first event.
    assert value(found, "authd_auth_required_events_total", outcome="unknown-identity") == 0
    assert value(found, "authd_spire_stream_failures_total", stream="workload-api") == 0
    assert value(found, "process_open_fds") > 0
    assert value(found, "authd_datapath_ringbuf_drops_total", type="auth-required") == 1
    assert value(found, "authd_datapath_ringbuf_drops_total", type="flow") == 0
    assert value(found, "authd_datapath_interfaces") == 2
    assert value(found, "authd_datapath_attach_mode", mode="tcx") == 1
    assert value(found, "authd_datapath_programs_ahead", interface="lxc1 (ifindex 7)") == 1
    assert value(found, "authd_datapath_reassertions_total") == 1
    assert value(found, "authd_job_restarts_total", job="http") == 1
    assert value(found, "authd_component_state", component="datapath", state="degraded") == 1
    assert value(found, "authd_component_state", component="datapath", state="ready") == 0
    assert value(found, "authd_ready") == 0  # datapath was never ready


def test_wireguard_families_aggregate_the_peers(ca: FakeCA) -> None:
    found = samples(build(ca)[0])
    assert value(found, "authd_wireguard_backend", backend="userspace") == 1
    assert value(found, "authd_wireguard_peers") == 1
    assert value(found, "authd_wireguard_nodes_without_peer") == 1
    assert value(found, "authd_wireguard_key_age_seconds") == 600
    assert value(found, "authd_wireguard_handshake_age_max_seconds") == 30
    assert value(found, "authd_wireguard_peers_without_handshake") == 0
    assert value(found, "authd_wireguard_peer_key_age_max_seconds") == 300
    assert value(found, "authd_wireguard_received_bytes_total") == 1000
    assert value(found, "authd_wireguard_sent_bytes_total") == 2000
    assert value(found, "authd_wireguard_rotations_total", result="ok") == 2
    assert value(found, "authd_wireguard_rotations_total", result="failed") == 0
    assert value(found, "authd_wireguard_keys_refused_total", reason="duplicate-key") == 1
    assert value(found, "authd_wireguard_keys_refused_total", reason="own-key") == 0


def test_ktls_families_say_why_pairs_are_denied(ca: FakeCA) -> None:
    found = samples(build(ca)[0])
    assert value(found, "authd_ktls_kernel_support") == 0
    assert value(found, "authd_ktls_denied_rules") == 2


def test_values_are_read_at_scrape_time(ca: FakeCA) -> None:
    view, parts = build(ca)
    registry = registry_for(view)
    parts.results.stats.attempts["ok"] += 10
    parts.snapshot = parts.snapshot.__class__(
        counters={"denied_auth_expired": 2},
        verdicts={("denied_auth_expired", Direction.INGRESS): 2},
        auth_capacity=2048,
        interfaces=(),
        events_decoded=0,
        events_malformed=3,
    )
    text = render(registry)[0].decode()
    assert 'authd_attestations_total{result="ok"} 13.0' in text
    # An expired auth entry is Cilium's AUTH_REQUIRED too: both counters add up in one series.
    assert (
        'authd_datapath_verdicts_total{direction="INGRESS",reason="AUTH_REQUIRED",verdict="DROPPED"} 2.0'
        in text
    )
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
    text = render(registry_for(view))[0].decode()
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
        n
        for n in names
        if n.startswith(("authd_svid", "authd_attest", "authd_datapath", "authd_auth_", "authd_ktls"))
    }


def test_openmetrics_when_the_scraper_asks(ca: FakeCA) -> None:
    view, _ = build(ca)
    body, content_type = render(registry_for(view), "application/openmetrics-text; version=1.0.0")
    assert content_type.startswith("application/openmetrics-text")
    parsed = openmetrics_families(body.decode())  # type: ignore[no-untyped-call]
    families = {f.name: f for f in parsed}
    assert families["authd_datapath_verdicts"].type == "counter"
    assert families["authd_build"].type == "info"
    assert body.decode().endswith("# EOF\n")


def test_histogram_bounds_and_overflow() -> None:
    histogram = Histogram((1.0, 2.0))
    for observed in (0.5, 1.0, 1.5, 9.0):
        histogram.observe(observed)
    assert histogram.cumulative() == [(1.0, 2), (2.0, 3), (float("inf"), 4)]
    assert histogram.count == 4
    assert histogram.sum == 12.0
    with pytest.raises(ValueError, match="strictly increasing"):
        Histogram((2.0, 1.0))
