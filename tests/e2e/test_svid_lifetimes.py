"""SVIDs that live 8 s: rotation under a running flow loses nothing; with SPIRE down, entries expire on
time and traffic is denied (fail closed); when SPIRE returns, so do the entries and the traffic.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import pytest

from authd.datapath.maps import AuthKey
from authd.devcluster import readings
from authd.devcluster.cluster import ClusterSpec, DevCluster, Rule, WorkloadSpec
from tests.e2e.checks import assert_lossless, connection_flows, denied

pytestmark = [pytest.mark.privileged, pytest.mark.e2e]

TTL = 8.0
LATE = timedelta(seconds=1.0)  # how long after its expiry an entry may still be seen (polling, load)
NODES = ("node-a", "node-b")

SPEC = ClusterSpec(
    workloads=(
        WorkloadSpec("frontend", "node-a", 2101),
        WorkloadSpec("helper", "node-a", 2102),
        WorkloadSpec("backend", "node-b", 2201),
        WorkloadSpec("db", "node-b", 2202),
    ),
    rules=(Rule("*", "backend"), Rule("*", "frontend")),
    svid_ttl=TTL,
    prefix="ae2",
)


def test_svid_rotation_under_a_flow_drops_nothing(cluster: DevCluster) -> None:
    first = cluster.wait_for_entry("node-b", "backend", "frontend")
    attested = cluster.attestations("node-b")
    before = {node: denied(cluster, node) for node in NODES}
    expiries = [first]
    flow = cluster.start_tcp("frontend", "backend")
    try:
        # Run until the entry the flow started with has expired; the pair must never be without one.
        deadline = time.monotonic() + 3 * TTL
        while (now := datetime.now(UTC)) < first + timedelta(seconds=1):
            assert time.monotonic() < deadline, f"no rotation within {3 * TTL} s: {expiries}"
            expiry = cluster.auth_expiry("node-b", "backend", "frontend")
            assert expiry is not None, f"the entry vanished at {now} (expiries so far {expiries})"
            assert expiry > now, f"the entry lapsed at {now}: {expiry}"
            if expiry != expiries[-1]:
                expiries.append(expiry)
            time.sleep(0.05)
    finally:
        report = cluster.finish(flow)

    assert len(expiries) >= 2, expiries
    assert_lossless(report)
    assert {node: denied(cluster, node) for node in NODES} == before
    frontend = str(cluster.workload("frontend").address)
    assert not readings.from_source(cluster.flows("node-b", "--verdict", "denied"), frontend)
    assert cluster.attestations("node-b") > attested  # frontend@node-a was attested again after rotating


def _entries(cluster: DevCluster) -> dict[tuple[str, AuthKey], datetime]:
    found: dict[tuple[str, AuthKey], datetime] = {}
    for node in NODES:
        with cluster.maps(node) as maps:
            found.update({(node, key): expiry for key, expiry in maps.auth.items()})
    return found


def test_spire_outage_entries_expire_on_time_traffic_denied_then_recovered(cluster: DevCluster) -> None:
    cluster.wait_for_entry("node-b", "backend", "frontend")
    cluster.wait_for_entry("node-a", "frontend", "backend")
    cluster.wait_for_entry("node-b", "backend", "db")  # a pair on one node
    cluster.stop_spire()
    stopped = datetime.now(UTC)
    try:
        # Nothing can be renewed now: every entry must go by its recorded expiry, the last one no later
        # than the lifetime of an SVID issued just before SPIRE stopped.
        overdue: list[tuple[str, AuthKey, datetime, datetime]] = []
        while entries := _entries(cluster):
            now = datetime.now(UTC)
            assert now < stopped + timedelta(seconds=TTL + 1) + LATE, f"entries outlived SPIRE: {entries}"
            for (node, key), expiry in entries.items():
                assert expiry <= stopped + timedelta(seconds=TTL + 1), (node, key, expiry)
                if now > expiry + LATE:
                    overdue.append((node, key, expiry, now))
            time.sleep(0.05)
        assert not overdue, f"entries stayed after their expiry: {overdue}"

        # Fail closed: the registered pair is denied now.
        counted = cluster.counters("node-b")
        report = cluster.tcp("frontend", "backend", connect_timeout=1.5)
        assert not report["connected"], report
        flows = connection_flows(cluster, "node-b", "frontend", report)
        assert {f["verdict"] for f in flows} == {"DROPPED"}, flows
        assert {f["drop_reason_desc"] for f in flows} == {"AUTH_REQUIRED"}, flows  # expired is required
        assert (
            readings.denied(cluster.counters("node-b")) - readings.denied(counted)
            == 1 + report["syn_retrans"]
        )
    finally:
        cluster.start_spire()

    # SPIRE is back: new SVIDs, attestations again, entries again, and traffic passes from its first SYN.
    cluster.wait_for_entry("node-b", "backend", "frontend", timeout=30)
    cluster.wait_for_entry("node-a", "frontend", "backend", timeout=30)
    assert_lossless(cluster.tcp("frontend", "backend"))
    assert_lossless(cluster.tcp("backend", "frontend"))
