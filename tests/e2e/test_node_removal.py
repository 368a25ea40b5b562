"""A node removed from cluster state: the other node forgets its pairs, and its workloads, still
running, become strangers whose traffic is denied.
"""

from __future__ import annotations

from ipaddress import ip_network

import pytest

from authd.devcluster.cluster import ClusterSpec, DevCluster, Rule, WorkloadSpec
from tests.e2e.checks import connection_flows

pytestmark = [pytest.mark.privileged, pytest.mark.e2e]

SPEC = ClusterSpec(
    workloads=(
        WorkloadSpec("frontend", "node-a", 2101),
        WorkloadSpec("helper", "node-a", 2102),
        WorkloadSpec("backend", "node-b", 2201),
        WorkloadSpec("db", "node-b", 2202),
    ),
    rules=(Rule("*", "frontend"), Rule("*", "backend")),
    prefix="ae2",
)


def test_removed_node_entries_disappear_on_the_other_node(cluster: DevCluster) -> None:
    cluster.wait_for_entry("node-a", "frontend", "backend")
    cluster.wait_for_entry("node-a", "frontend", "db")
    cluster.wait_for_entry("node-a", "frontend", "helper")
    key = cluster.pair_key("node-a", "frontend", "backend")
    assert key is not None
    node_b = key.remote_node
    assert node_b != 0

    cluster.remove_node("node-b")

    def forgotten() -> bool:
        # node-b's authd may withdraw its identities over the channel before node-a reads the new
        # cluster state: the auth entries can go first, the ipcache entries follow with the state.
        with cluster.maps("node-a") as maps:
            return not any(k.remote_node == node_b for k, _ in maps.auth.items()) and all(
                maps.ipcache.get(ip_network(cluster.workload(workload).address)) is None
                for workload in ("backend", "db")
            )

    cluster.wait_for(forgotten, 10, "node-a to drop node-b's auth and ipcache entries")
    # The pairs on node-a itself are untouched.
    assert cluster.auth_expiry("node-a", "frontend", "helper") is not None

    # backend still runs, but nothing vouches for it any more.
    report = cluster.tcp("backend", "frontend", connect_timeout=1.5)
    assert not report["connected"], report
    flows = connection_flows(cluster, "node-a", "backend", report)
    assert {f["verdict"] for f in flows} == {"DROPPED"}, flows
    assert {f["drop_reason_desc"] for f in flows} == {"AUTH_REQUIRED"}, flows
    assert flows[0]["source"]["identity"] == 2  # the world, as Cilium numbers it
