"""What an operator sees of a two-node cluster: /metrics, /readyz, ``authd status``, named ``bpf`` listings.

(authd under the unit's sandbox and capabilities is tested under a real systemd: tests/system.)

One dev cluster (prefix ``aop``) serves every test here: a1 on node-a may reach b1 on node-b only
authenticated (ingress at b1); c1 on node-a is not in cluster state, so it is denied.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from authd.devcluster.cluster import ClusterSpec, DevCluster, Rule, WorkloadSpec
from authd.devcluster.netns import in_netns

pytestmark = pytest.mark.privileged

SPEC = ClusterSpec(
    prefix="aop",
    workloads=(
        WorkloadSpec("a1", "node-a", 2301),
        WorkloadSpec("b1", "node-b", 2302),
        WorkloadSpec("c1", "node-a", 2303, registered=False),
    ),
    rules=(Rule("*", "b1"),),
)
METRICS_PORT = 9464


def spiffe(name: str) -> str:
    return SPEC.spiffe_id(name)


@pytest.fixture(scope="module")
def cluster() -> Iterator[DevCluster]:
    with DevCluster(SPEC) as built:
        report = built.tcp("a1", "b1", duration=0.3, connect_timeout=5)
        assert report["connected"], report
        yield built


def http_get(cluster: DevCluster, node: str, path: str) -> tuple[int, str]:
    """GET from the node's HTTP endpoints on its loopback, from inside its network namespace."""
    script = (
        "import sys, urllib.request, urllib.error\n"
        "try:\n"
        f"    r = urllib.request.urlopen('http://127.0.0.1:{METRICS_PORT}{path}', timeout=5)\n"
        "    code, body = r.status, r.read()\n"
        "except urllib.error.HTTPError as e:\n"
        "    code, body = e.code, e.read()\n"
        "print(code); sys.stdout.write(body.decode())\n"
    )
    netns = cluster.network.nodes[node].netns
    out = subprocess.run(
        in_netns(netns, [sys.executable, "-c", script]),
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    code, _, body = out.partition("\n")
    return int(code), body


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text format (0 when absent)."""
    for line in text.splitlines():
        match = re.fullmatch(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (\S+)", line)
        if match is None or match.group(1) != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(3) or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(match.group(4))
    return 0.0


def status(cluster: DevCluster, node: str) -> dict[str, Any]:
    return dict(json.loads(cluster.authd(node, "status", "--json")))


def test_metrics_count_attestations_and_verdicts(cluster: DevCluster) -> None:
    denied = cluster.tcp("c1", "b1", duration=0.2, connect_timeout=1)
    assert not denied["connected"]
    code, b = http_get(cluster, "node-b", "/metrics")
    assert code == 200
    assert sample(b, "authd_attestations_total", result="ok") >= 1
    assert sample(b, "authd_attestation_duration_seconds_count") >= 1
    verdicts = "authd_datapath_verdicts_total"
    # The SYNs into b1 are ingress; b1's replies out are egress, passed by their flow.
    assert sample(b, verdicts, verdict="FORWARDED", reason="AUTHENTICATED", direction="INGRESS") >= 1
    assert sample(b, verdicts, verdict="FORWARDED", reason="ESTABLISHED", direction="EGRESS") >= 1
    assert sample(b, verdicts, verdict="DROPPED", reason="AUTH_REQUIRED", direction="INGRESS") >= 1
    assert sample(b, verdicts, verdict="DROPPED", reason="AUTH_REQUIRED", direction="EGRESS") == 0
    assert sample(b, "authd_svids", kind="own") == 1
    assert sample(b, "authd_svids", kind="workload") == 1
    assert sample(b, "authd_svid_expiry_timestamp_seconds", kind="own") > time.time() + 60
    assert sample(b, "authd_auth_map_entries") >= 1
    assert sample(b, "authd_auth_map_capacity") == 524288
    assert sample(b, "authd_cluster_state_updates_total", result="applied") >= 1
    assert sample(b, "authd_ready") == 1
    # Low cardinality: no SPIFFE ID, node name or address appears as a label value.
    assert "spiffe://" not in b
    assert "node-a" not in b
    assert "10.231." not in b

    code, a = http_get(cluster, "node-a", "/metrics")
    assert code == 200
    assert sample(a, "authd_channel_proofs_sent_total") >= 1
    assert sample(a, "authd_channels") == 1  # one peer node; up or re-established after a rotation

    code, ready = http_get(cluster, "node-b", "/readyz")
    assert code == 200
    names = {c["name"]: c["state"] for c in json.loads(ready)["components"]}
    assert names["svids"] == names["datapath"] == names["cluster"] == "ready"
    assert http_get(cluster, "node-b", "/healthz") == (200, '{"alive": true, "healthy": true}')


def test_a_live_scrape_passes_promtools_metric_lint(cluster: DevCluster) -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: `make system-deps` installs Debian's prometheus package"
    for node in ("node-a", "node-b"):
        code, body = http_get(cluster, node, "/metrics")
        assert code == 200
        assert "authd_datapath_verdicts_total{" in body
        linted = subprocess.run(
            [promtool, "check", "metrics"],
            input=body,
            capture_output=True,
            text=True,
            check=False,
            timeout=30,
        )
        assert linted.returncode == 0, linted.stdout + linted.stderr
        assert linted.stdout.strip() == "", linted.stdout


def test_status_shows_svids_with_expiry_and_peers(cluster: DevCluster) -> None:
    report = status(cluster, "node-b")
    assert report["ready"]
    assert report["healthy"]
    assert report["spire"]["connected"]
    own = report["svids"]["own"]
    assert own["spiffe_id"] == "spiffe://example.org/authd/node-b"
    assert own["expires_in_s"] > 60
    assert [w["spiffe_id"] for w in report["svids"]["workloads"]] == [spiffe("b1")]
    (peer,) = [p for p in report["peers"] if p["spiffe_id"] == spiffe("a1")]
    assert peer["node"] == "node-a"
    assert peer["attested"]
    assert peer["expires_in_s"] > 60
    assert report["auth_map"]["entries"] >= 1
    assert report["datapath"]["interfaces"] == ["lxc0"]

    text = cluster.authd("node-b", "status")
    assert "own SVID:  spiffe://example.org/authd/node-b expires" in text
    assert f"{spiffe('a1')} at node-a: attested via" in text


def test_bpf_listings_name_the_handles(cluster: DevCluster) -> None:
    rows = cluster.auth_entries("node-b")
    named = {(r["local_id"], r["remote_id"], r["remote_node_name"]) for r in rows}
    assert (spiffe("b1"), spiffe("a1"), "node-a") in named
    ipcache = [
        json.loads(line) for line in cluster.authd("node-b", "bpf", "ipcache", "list", "--json").splitlines()
    ]
    by_id = {row["spiffe_id"]: row["node_name"] for row in ipcache}
    assert by_id[spiffe("a1")] == "node-a"
    assert by_id[spiffe("b1")] == "node-b"
    policy = cluster.authd("node-b", "bpf", "policy", "list")
    assert spiffe("b1") in policy
    assert "any" in policy
