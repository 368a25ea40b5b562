"""A rule with ``encrypt = "ktls"`` on a node that cannot carry the pair in kernel TLS fails closed.

Two nodes running ``authd run``: frontend (node-a) may reach backend (node-b) only in kTLS, and db only
authenticated. On this host the kernel has no TLS (``TCP_ULP "tls"`` gives ENOENT); even on one that
has it, this authd has no kTLS capture yet. Either way the pair is denied, never passed in clear, and
status, /readyz, the metrics and the log say why. The plain pair next to it passes from its first SYN.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from authd.devcluster import readings
from authd.devcluster.cluster import ClusterSpec, DevCluster, Rule, WorkloadSpec
from authd.ktls.support import probe
from tests.privileged.test_operations import http_get, sample

pytestmark = pytest.mark.privileged

SPEC = ClusterSpec(
    prefix="akt",
    workloads=(
        WorkloadSpec("frontend", "node-a", 2401),
        WorkloadSpec("backend", "node-b", 2402),
        WorkloadSpec("db", "node-b", 2403),
    ),
    rules=(Rule("frontend", "backend", encrypt="ktls"), Rule("*", "db")),
)
KERNEL = probe()
WHY = KERNEL.reason if not KERNEL.available else "this authd has no kTLS transparent capture yet"


@pytest.fixture(scope="module")
def cluster() -> Iterator[DevCluster]:
    with DevCluster(SPEC) as built:
        built.wait_for_entry("node-b", "db", "frontend")
        yield built


def test_the_ktls_rule_is_a_ktls_policy_entry(cluster: DevCluster) -> None:
    listed = [
        json.loads(line) for line in cluster.authd("node-b", "bpf", "policy", "list", "--json").splitlines()
    ]
    by_pair = {(row["local_id"], row["remote_id"], row["direction"]): row["auth_type"] for row in listed}
    assert by_pair[(SPEC.spiffe_id("backend"), SPEC.spiffe_id("frontend"), "INGRESS")] == "KTLS"
    assert by_pair[(SPEC.spiffe_id("db"), "any", "INGRESS")] == "SPIRE"


def test_the_ktls_pair_is_denied_and_the_plain_pair_passes(cluster: DevCluster) -> None:
    before = cluster.counters("node-b")["denied_encryption_unavailable"]
    refused = cluster.tcp("frontend", "backend", duration=0.2, connect_timeout=2)
    assert not refused["connected"], refused
    after = cluster.counters("node-b")
    assert after["denied_encryption_unavailable"] > before
    assert cluster.tcp("frontend", "db", duration=0.2, connect_timeout=5)["connected"]
    drops = [
        f
        for f in cluster.flows("node-b")
        if f["verdict"] == "DROPPED"
        and readings.spiffe_id(f["destination"]) == SPEC.spiffe_id("backend")
        and readings.spiffe_id(f["source"]) == SPEC.spiffe_id("frontend")
    ]
    assert drops
    assert {f["drop_reason_desc"] for f in drops} == {"UNENCRYPTED_TRAFFIC"}
    assert any("Traffic is unencrypted DROPPED" in line for line in cluster.observe("node-b"))


def test_status_readyz_metrics_and_log_say_why(cluster: DevCluster) -> None:
    if not KERNEL.available:
        assert "ENOENT" in WHY  # this host: TCP_ULP "tls" is not found
    reason = f'1 encrypt = "ktls" rule(s) enforced here: their pairs are denied: {WHY}'
    report = json.loads(cluster.authd("node-b", "status", "--json"))
    components = {c["name"]: c for c in report["health"]}
    assert (components["ktls"]["state"], components["ktls"]["reason"]) == ("degraded", reason)
    assert report["ready"]  # the rest of the node enforces as before
    assert f"  {'ktls':<28} degraded: {reason}" in cluster.authd("node-b", "status").splitlines()
    # node-a enforces no kTLS rule (the rule is checked at backend's ingress): nothing denied there.
    node_a = {c["name"]: c for c in json.loads(cluster.authd("node-a", "status", "--json"))["health"]}
    assert node_a["ktls"]["state"] == "ready"

    code, body = http_get(cluster, "node-b", "/readyz")
    assert code == 200
    ready = {c["name"]: c for c in json.loads(body)["components"]}
    assert ready["ktls"]["state"] == "degraded"
    assert WHY in ready["ktls"]["reason"]

    code, metrics = http_get(cluster, "node-b", "/metrics")
    assert code == 200
    assert sample(metrics, "authd_ktls_kernel_support") == float(KERNEL.available)
    assert sample(metrics, "authd_ktls_denied_rules") == 1
    assert sample(metrics, "authd_component_state", component="ktls", state="degraded") == 1
    assert (
        sample(metrics, "authd_datapath_verdicts_total", verdict="DROPPED", reason="UNENCRYPTED_TRAFFIC") >= 1
    )

    logged = [
        (record.get("rules"), record.get("reason"))
        for record in readings.events(cluster.log_path("node-b"))
        if record.get("event") == "pairs under encrypt = ktls are denied, never passed in clear"
    ]
    assert logged == [(1, WHY)]
