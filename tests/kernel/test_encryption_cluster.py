"""Two real ``authd run`` nodes with ``[encryption] mode = "wireguard"`` on kernel WireGuard, in the guest.

The host's e2e module (tests/e2e/test_encryption.py) runs the same cluster on wireguard-go; here the
backend is forced to ``kernel`` (``[encryption] backend``), so no node can fall back to wireguard-go, and
the status test checks both report the kernel backend. The harness (authd/devcluster) builds the nodes,
dev-spire and the workloads as it does on the host; its waits are stretched for the emulated CPU
(``timeout_scale``), and so are this module's. Status is polled over each node's control socket from this
process (each CLI call is a new Python process, slow on the emulated CPU); the assertions read what the
CLI prints.
"""

from __future__ import annotations

import json
import re
import socket
import struct
import time
from typing import Any

from authd.control import ControlClient, socket_path
from authd.datapath.netns import run_in_netns
from authd.devcluster.cluster import (
    UDP_PORT,
    WIREGUARD_INTERFACE,
    ClusterSpec,
    DevCluster,
    Rule,
    WorkloadSpec,
)
from authd.devcluster.netns import in_netns, sh
from tests.e2e.conftest import cluster
from tests.e2e.test_encryption import NETNS, assert_crosses_only_encrypted, echo
from tests.fakes import packets as pk
from tests.privileged.test_encryption_tunnel import checksum

__all__ = ["cluster"]

SPEC = ClusterSpec(
    workloads=(WorkloadSpec("web", "node-a", 2301), WorkloadSpec("db", "node-b", 2302)),
    rules=(Rule("web", "db"),),
    prefix="akw",
    encryption=True,
    encryption_backend="kernel",
    timeout_scale=4.0,
)
PATIENCE = 120.0
"""Seconds this module waits for a condition the daemons reach on their own (peers, handshakes, keys)."""


def status(cluster: DevCluster, node: str) -> dict[str, Any]:
    """The node's status report, as ``authd status --json`` prints it, read from its control socket."""
    client = ControlClient(socket_path(cluster.workdir / node / "run"), timeout=30.0)
    (report,) = client.request("status")
    return report


def encryption(cluster: DevCluster, node: str) -> dict[str, Any]:
    """The ``encryption`` part of the node's status report."""
    report: dict[str, Any] = status(cluster, node)["encryption"]
    return report


def handshaken(cluster: DevCluster) -> None:
    """Wait until each node has its one peer and has completed a handshake with it."""
    for node in ("node-a", "node-b"):

        def ready(node: str = node) -> bool:
            peers = encryption(cluster, node)["peers"]
            if len(peers) != 1:
                return False
            if peers[0]["handshake_age_s"] is None:
                echo(cluster, b"handshake")  # the tunnel starts its handshake on the first packet
                return False
            return True

        cluster.wait_for(ready, PATIENCE, f"{node}'s peer and a handshake with it")


def echoed(cluster: DevCluster, payload: bytes) -> bool:
    """Whether ``payload`` comes back from db's echo server within the module's patience."""
    deadline = time.monotonic() + PATIENCE
    while time.monotonic() < deadline:
        if echo(cluster, payload) == payload:
            return True
    return False


def test_status_reports_the_kernel_backend_and_a_handshake_with_the_other_node(cluster: DevCluster) -> None:
    handshaken(cluster)
    a = json.loads(cluster.authd("node-a", "status", "--json"))["encryption"]
    b = encryption(cluster, "node-b")
    assert a["backend"] == "kernel"
    assert b["backend"] == "kernel"
    (peer,) = a["peers"]
    assert peer["node"] == "node-b"
    assert peer["public_key"] == b["public_key"]  # learned over the node channel
    assert peer["allowed_ips"] == [f"{cluster.address('db')}/32"]
    assert peer["handshake_age_s"] is not None
    text = cluster.authd("node-b", "encryption", "status")
    assert f"encryption: wireguard (kernel) on {WIREGUARD_INTERFACE}" in text, text
    assert "wireguard peers (1):" in text, text
    (line,) = [line for line in text.splitlines() if line.startswith("  node-a ")]
    assert f"key {a['public_key']}" in line, line
    assert re.search(r", handshake \S+ ago,", line), line
    # The interface is a kernel link, and no wireguard-go runs for it.
    link = sh(*in_netns(f"{SPEC.prefix}-node-a", ["ip", "-d", "link", "show", WIREGUARD_INTERFACE]))
    assert "wireguard" in link.split(), link
    assert not list((cluster.workdir / "node-a" / "run").glob("wireguard-go.*"))


def test_a_marker_between_workloads_crosses_the_underlay_only_encrypted(cluster: DevCluster) -> None:
    handshaken(cluster)
    cluster.wait_for_entry("node-b", "db", "web")
    assert_crosses_only_encrypted(cluster, b"AUTHD-KERNEL-WG-MARKER-" + b"k" * 32)


def mac(netns: str, link: str) -> bytes:
    """The link's MAC address."""
    text = sh(*in_netns(netns, ["ip", "-br", "link", "show", link])).split()[2]
    return bytes.fromhex(text.replace(":", ""))


def not_encrypted(cluster: DevCluster, node: str) -> int:
    """The node's ``denied_not_encrypted`` counter, as ``authd bpf counters --json`` prints it."""
    rows = map(json.loads, cluster.authd(node, "bpf", "counters", "--json").splitlines())
    return next(int(row["value"]) for row in rows if row["counter"] == "denied_not_encrypted")


def test_a_cleartext_datagram_claiming_the_remote_workload_is_dropped_not_encrypted(
    cluster: DevCluster,
) -> None:
    handshaken(cluster)
    cluster.wait_for_entry("node-b", "db", "web")
    web = run_in_netns(NETNS / cluster.workload("web").netns, lambda: socket.socket(type=socket.SOCK_DGRAM))
    with web:
        web.bind((cluster.address("web"), 0))
        web.settimeout(5.0)  # for db's answer, both times
        port = web.getsockname()[1]
        # Through the tunnel, from this socket: db's echo comes back to it (so the check below could fail).
        web.sendto(b"sealed", (cluster.address("db"), UDP_PORT))
        assert web.recv(100) == b"sealed"
        before = not_encrypted(cluster, "node-b")

        # A datagram from that address and port in clear, framed as node-a would send it to node-b.
        payload = b"clear, claiming web"
        packet = pk.ipv4(
            cluster.address("web"), cluster.address("db"), pk.UDP, pk.udp(port, UDP_PORT, payload)
        )
        header = bytearray(packet[:20])
        struct.pack_into("!H", header, 10, checksum(bytes(header)))
        frame = (
            mac(f"{SPEC.prefix}-node-b", "eth0")
            + mac(f"{SPEC.prefix}-node-a", "eth0")
            + struct.pack("!H", pk.ETH_P_IP)
            + bytes(header)
            + packet[20:]
        )
        uplink_b = f"up{cluster.network.nodes['node-b'].index}"  # the fabric's end of node-b's eth0

        def inject() -> None:
            with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as raw:
                raw.bind((uplink_b, 0))
                raw.send(frame)

        run_in_netns(NETNS / f"{SPEC.prefix}-fabric", inject)
        try:
            reply = web.recv(100)
        except TimeoutError:
            reply = None
    assert reply is None, "db answered a cleartext datagram claiming web"
    assert not_encrypted(cluster, "node-b") == before + 1


def test_a_rotation_reaches_the_other_node_and_traffic_still_flows(cluster: DevCluster) -> None:
    handshaken(cluster)
    before = encryption(cluster, "node-a")["public_key"]
    out = cluster.authd("node-a", "encryption", "rotate")
    after = encryption(cluster, "node-a")["public_key"]
    assert after != before
    assert after in out
    cluster.wait_for(
        lambda: encryption(cluster, "node-b")["peers"][0]["public_key"] == after, PATIENCE, "the new key"
    )
    assert echoed(cluster, b"after rotation")
    text = cluster.authd("node-b", "encryption", "status")
    assert f"key {after}" in text, text
