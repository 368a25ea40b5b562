"""What an operator sees of a two-node cluster: /metrics, /readyz, ``authd status``, named ``bpf`` listings,
and authd running inside the systemd unit's sandbox with only the unit's capabilities.

One dev cluster (prefix ``aop``) serves every test here: a1 on node-a may reach b1 on node-b only
authenticated (ingress at b1); c1 on node-a is not in cluster state, so it is denied.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from authd.datapath.loader import attached_prog_ids
from authd.datapath.netns import run_in_netns
from authd.devcluster.cluster import ClusterSpec, DevCluster, Rule, WorkloadSpec
from authd.devcluster.netns import in_netns

pytestmark = pytest.mark.privileged

ROOT = Path(__file__).parents[2]
UNIT = ROOT / "systemd" / "authd.service"
SANDBOX = Path(__file__).with_name("unit_sandbox.py")
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
    assert sample(b, "authd_datapath_verdicts_total", verdict="allowed", reason="authenticated") >= 1
    assert sample(b, "authd_datapath_verdicts_total", verdict="denied", reason="auth-required") >= 1
    assert sample(b, "authd_svids", kind="own") == 1
    assert sample(b, "authd_svids", kind="workload") == 1
    assert sample(b, "authd_svid_expiry_seconds", kind="own") > 60
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
    assert sample(a, "authd_attestations_served_total") >= 1

    code, ready = http_get(cluster, "node-b", "/readyz")
    assert code == 200
    names = {c["name"]: c["state"] for c in json.loads(ready)["components"]}
    assert names["svids"] == names["datapath"] == names["cluster"] == "ready"
    assert http_get(cluster, "node-b", "/healthz") == (200, '{"alive": true, "healthy": true}')


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


def _start_sandboxed(cluster: DevCluster, node: str) -> tuple[subprocess.Popen[bytes], Path]:
    """authd on ``node`` inside the unit's sandbox, as systemd would start it; return once READY=1."""
    entry = cluster._nodes[node]  # the harness's record of the node: its config and directories
    node_dir = entry.config.parent
    for sub in ("state", "run"):
        (node_dir / sub).mkdir(exist_ok=True)
    notify_path = cluster.workdir / f"{node}-sandbox.notify"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    log_path = cluster.workdir / "logs" / f"authd-{node}-sandbox.log"
    sandbox = [
        "/usr/bin/python3", str(SANDBOX), str(UNIT),
        "--keep", str(cluster.workdir), "--keep", str(ROOT),  # a checkout under /tmp stays visible
        "--rw", str(node_dir / "state"), "--rw", str(node_dir / "run"),
        "--",
        sys.executable, "-m", "authd", "run", "--config", str(entry.config),
    ]  # fmt: skip
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            in_netns(entry.net.netns, sandbox),
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "NOTIFY_SOCKET": str(notify_path)},
        )
    try:
        deadline = time.monotonic() + 60
        notify.settimeout(0.5)
        while True:
            assert proc.poll() is None, f"authd in the sandbox exited: {log_path.read_text()[-3000:]}"
            assert time.monotonic() < deadline, (
                f"authd in the sandbox not ready: {log_path.read_text()[-3000:]}"
            )
            try:
                if b"READY=1" in notify.recv(4096):
                    return proc, log_path
            except TimeoutError:
                continue
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    finally:
        notify.close()


def test_authd_runs_in_the_units_sandbox_with_its_capabilities(cluster: DevCluster) -> None:
    if (
        not Path("/usr/bin/python3").exists()
        or subprocess.run(
            ["/usr/bin/python3", "-c", "import seccomp"], capture_output=True, check=False
        ).returncode
    ):
        pytest.fail("the unit sandbox needs Debian's python3-seccomp (make system-deps installs it)")
    cluster.stop_authd("node-b")
    cluster.authd("node-b", "bpf", "unload")  # a fresh load, attach and pin under the unit's limits
    proc, log_path = _start_sandboxed(cluster, "node-b")
    try:
        # nsenter, the sandbox stages and setpriv all exec: the process is authd itself.
        caps = Path(f"/proc/{proc.pid}/status").read_text()
        assert re.search(r"CapEff:\s+000000c000001000", caps), caps  # CAP_NET_ADMIN, CAP_PERFMON, CAP_BPF
        assert re.search(r"NoNewPrivs:\s+1", caps), caps
        assert re.search(r"Seccomp:\s+2", caps), caps
        allowed = cluster.tcp("a1", "b1", duration=0.3, connect_timeout=5)
        assert allowed["connected"], allowed
        denied = cluster.tcp("c1", "b1", duration=0.2, connect_timeout=1)
        assert not denied["connected"], denied
        report = status(cluster, "node-b")
        (peer,) = [p for p in report["peers"] if p["spiffe_id"] == spiffe("a1")]
        assert peer["attested"], report
        assert report["datapath"]["interfaces"] == ["lxc0"]
        assert report["healthy"], report
        # A reload that drops the interface detaches from it, without CAP_SYS_ADMIN to look programs up.
        config = cluster._nodes["node-b"].config
        original = config.read_text()
        config.write_text(original.replace('interfaces = ["lxc*"]', 'interfaces = ["aopnone*"]'))
        try:
            proc.send_signal(signal.SIGHUP)
            cluster.wait_for(lambda: not _attached(cluster, "node-b"), 10, "detach on reload")
        finally:
            config.write_text(original)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            assert proc.wait(20) == 0, log_path.read_text()[-3000:]
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    cluster.start_authd("node-b")


def _attached(cluster: DevCluster, node: str) -> bool:
    """Whether lxc0 runs any authd program: a tcx link, or a tc filter."""
    netns = Path("/run/netns") / cluster.network.nodes[node].netns
    progs = run_in_netns(netns, lambda: attached_prog_ids(socket.if_nametoindex("lxc0")))
    return progs != (None, None) or "authd" in _tc_filters(cluster, node)


def _tc_filters(cluster: DevCluster, node: str) -> str:
    netns = cluster.network.nodes[node].netns
    return subprocess.run(
        in_netns(netns, ["tc", "filter", "show", "dev", "lxc0", "ingress"]),
        capture_output=True,
        text=True,
        check=True,
    ).stdout


def test_the_sandbox_enforces_what_it_emulates(tmp_path: Path) -> None:
    writable = tmp_path / "state"
    writable.mkdir()
    probe = (
        "import errno, os, socket, pathlib, sys\n"
        f"pathlib.Path('{writable}/ok').write_text('x')\n"
        "results = []\n"
        "for attempt in (lambda: pathlib.Path('/etc/aop-probe').write_text('x'),\n"
        "                lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW),\n"
        "                lambda: os.unshare(0) if hasattr(os, 'unshare') else os.setuid(0),\n"
        "                lambda: os.chroot('/')):\n"
        "    try:\n"
        "        attempt(); results.append('allowed')\n"
        "    except OSError as err:\n"
        "        results.append(errno.errorcode[err.errno])\n"
        "print(' '.join(results))\n"
    )
    argv = ["/usr/bin/python3", str(SANDBOX), str(UNIT), "--keep", str(tmp_path), "--keep", str(ROOT)]
    argv += ["--rw", str(writable), "--"]
    out = subprocess.run(
        [*argv, "/usr/bin/python3", "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.split() == ["EROFS", "EAFNOSUPPORT", "EPERM", "EPERM"], out.stderr
    assert (writable / "ok").read_text() == "x"
    assert not Path("/etc/aop-probe").exists()
