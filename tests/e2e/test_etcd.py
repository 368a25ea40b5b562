"""Two authd nodes reading cluster state from etcd (``ClusterSpec(source="etcd")``): one etcd member on
the wire, state loaded with ``authd cluster push``. A registered pair passes from its first SYN, and a
workload added by a push at run time is attested and passes from its first SYN, as with the file source.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from authd.devcluster import readings
from authd.devcluster.cluster import ClusterSpec, DevCluster, Rule, WorkloadSpec
from tests.e2e.checks import assert_lossless, connection_flows, denied

pytestmark = [pytest.mark.privileged, pytest.mark.e2e]

SPEC = ClusterSpec(
    workloads=(
        WorkloadSpec("frontend", "node-a", 2101),
        WorkloadSpec("late", "node-a", 2103, registered=False),
        WorkloadSpec("backend", "node-b", 2201),
    ),
    rules=(Rule("*", "backend"),),
    prefix="ae2",
    source="etcd",
)


def first_syn(cluster: DevCluster, client: str, report: dict[str, Any]) -> dict[str, Any]:
    flows = connection_flows(cluster, "node-b", client, report)
    assert not [f for f in flows if f["verdict"] == "DROPPED"], flows
    return next(f for f in flows if f["traffic_direction"] == "INGRESS" and readings.tcp_flags(f) == {"SYN"})


def test_both_nodes_follow_etcd(cluster: DevCluster) -> None:
    for node in ("node-a", "node-b"):
        log = cluster.log_path(node)
        assert readings.count_events(log, "etcd snapshot read") >= 1, node
        status = json.loads(cluster.authd(node, "status", "--json"))
        assert status["cluster"]["out_of_touch_s"] is None, status["cluster"]


def test_registered_pair_is_allowed_from_its_first_syn(cluster: DevCluster) -> None:
    cluster.wait_for_entry("node-b", "backend", "frontend")
    before = denied(cluster, "node-b")

    report = cluster.tcp("frontend", "backend")

    assert_lossless(report)
    syn = first_syn(cluster, "frontend", report)
    assert syn["verdict"] == "FORWARDED"
    assert syn["auth_type"] == "SPIRE"
    assert denied(cluster, "node-b") == before


def test_workload_pushed_at_run_time_is_attested_and_passes_from_its_first_syn(cluster: DevCluster) -> None:
    assert cluster.pair_key("node-b", "backend", "late") is None
    assert SPEC.spiffe_id("late") not in cluster.authd("node-b", "cluster", "export")
    before = denied(cluster, "node-b")
    attested = cluster.attestations("node-b")

    cluster.register("late")  # `authd cluster push` of the new state, then `authd spire sync`
    assert SPEC.spiffe_id("late") in cluster.authd("node-b", "cluster", "export")
    cluster.wait_for_entry("node-b", "backend", "late", timeout=20)
    report = cluster.tcp("late", "backend")

    assert_lossless(report)
    syn = first_syn(cluster, "late", report)
    assert syn["verdict"] == "FORWARDED"
    assert readings.spiffe_id(syn["source"]) == SPEC.spiffe_id("late")
    assert cluster.attestations("node-b") > attested  # node-b attested late at node-a
    assert denied(cluster, "node-b") == before
