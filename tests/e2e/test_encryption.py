"""``mode = "wireguard"`` with real ``authd run`` processes: two nodes whose workloads talk through the
tunnel authd keys over its node channel (wireguard-go on this host; kernel WireGuard where it exists)."""

from __future__ import annotations

import json
import signal
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from authd.datapath.netns import run_in_netns
from authd.devcluster.cluster import (
    UDP_PORT,
    WIREGUARD_INTERFACE,
    ClusterSpec,
    DevCluster,
    Rule,
    WorkloadSpec,
)
from tests.privileged.wgmesh import PORT, Capture

pytestmark = [pytest.mark.privileged, pytest.mark.e2e]

SPEC = ClusterSpec(
    workloads=(WorkloadSpec("web", "node-a", 2301), WorkloadSpec("db", "node-b", 2302)),
    rules=(Rule("web", "db"),),
    prefix="ae2",
    encryption=True,
)
NETNS = Path("/run/netns")


def encryption(cluster: DevCluster, node: str) -> dict[str, Any]:
    report: dict[str, Any] = json.loads(cluster.authd(node, "status", "--json"))["encryption"]
    return report


def peered(cluster: DevCluster) -> None:
    for node in ("node-a", "node-b"):
        cluster.wait_for(lambda n=node: len(encryption(cluster, n)["peers"]) == 1, 30, f"{node}'s peer")  # type: ignore[misc]


def echo(cluster: DevCluster, payload: bytes) -> bytes | None:
    """``payload`` from web to db's UDP echo server, and what came back."""

    def send() -> bytes | None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(1.0)
            for _ in range(3):
                sock.sendto(payload, (cluster.address("db"), UDP_PORT))
                try:
                    return sock.recv(4096)
                except TimeoutError:
                    continue
        return None

    return run_in_netns(NETNS / cluster.workload("web").netns, send)


def assert_crosses_only_encrypted(cluster: DevCluster, marker: bytes) -> None:
    """``marker`` echoed between web and db five times: never on the fabric, which saw the tunnel's
    datagrams both ways (so that the first check could fail)."""
    capture = Capture(NETNS / f"{cluster.spec.prefix}-fabric")
    try:
        replies = [echo(cluster, marker) for _ in range(5)]
    finally:
        frames = capture.stop()
    assert replies == [marker] * 5
    assert not [frame for frame in frames if marker in frame]
    tunnel = [
        f for f in frames if len(f) > 42 and PORT in (int.from_bytes(f[34:36]), int.from_bytes(f[36:38]))
    ]
    assert len(tunnel) >= 10


def test_a_marker_between_workloads_never_crosses_the_wire_in_clear(cluster: DevCluster) -> None:
    peered(cluster)
    cluster.wait_for_entry("node-b", "db", "web")
    assert_crosses_only_encrypted(cluster, b"AUTHD-WG-MARKER-" + b"x" * 32)


def test_status_lists_the_peer_with_its_key_ages_and_the_backend(cluster: DevCluster) -> None:
    peered(cluster)
    a, b = encryption(cluster, "node-a"), encryption(cluster, "node-b")
    assert a["backend"] in ("kernel", "userspace")
    (peer,) = a["peers"]
    assert peer["node"] == "node-b"
    assert peer["public_key"] == b["public_key"]  # learned over the channel
    assert peer["allowed_ips"] == [f"{cluster.address('db')}/32"]
    assert peer["key_age_s"] is not None
    assert peer["psk_age_s"] is not None
    assert "wireguard peers (1):" in cluster.authd("node-a", "encryption", "status")


def test_a_rotation_reaches_the_other_node(cluster: DevCluster) -> None:
    peered(cluster)
    before = encryption(cluster, "node-a")["public_key"]
    out = cluster.authd("node-a", "encryption", "rotate")
    after = encryption(cluster, "node-a")["public_key"]
    assert after != before
    assert after in out
    cluster.wait_for(
        lambda: encryption(cluster, "node-b")["peers"][0]["public_key"] == after, 5, "the new key"
    )
    assert echo(cluster, b"after rotation") == b"after rotation"


def test_kill_9_and_restart_under_a_flow_keep_the_tunnel(cluster: DevCluster) -> None:
    peered(cluster)
    flow = cluster.start_tcp("web", "db", interval=0.01)
    time.sleep(1.0)
    cluster.stop_authd("node-a", sig=signal.SIGKILL)
    time.sleep(0.5)
    cluster.start_authd("node-a")
    peered(cluster)
    time.sleep(1.0)
    report = cluster.finish(flow)
    assert report["connected"]
    assert report["echoed"] == report["sent"] > 100
    assert report["total_retrans"] == 0
    assert "wireguard interface adopted" in cluster.log_path("node-a").read_text()


def test_a_node_removed_from_cluster_state_loses_its_peer_within_a_second(cluster: DevCluster) -> None:
    peered(cluster)
    pid_file = cluster.workdir / "node-a" / "run" / f"wireguard-go.{WIREGUARD_INTERFACE}.pid"
    userspace = pid_file.exists()

    def gone() -> bool:
        if userspace:  # the device itself: no peer left
            return "public_key=" not in uapi_get(int(pid_file.read_text()))
        return not encryption(cluster, "node-a")["peers"]

    assert not gone()
    started = time.monotonic()
    cluster.remove_node("node-b")
    cluster.wait_for(gone, 5, "node-b's peer to go")
    # 1 s; without the device's own socket (kernel backend), plus one `authd status` round trip.
    assert time.monotonic() - started < (1.0 if userspace else 1.5)


def uapi_get(pid: int) -> str:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(f"/proc/{pid}/root/run/wireguard/{WIREGUARD_INTERFACE}.sock")
        sock.sendall(b"get=1\n\n")
        reply = b""
        while not reply.endswith(b"\n\n"):
            reply += sock.recv(65536)
    return reply.decode()
