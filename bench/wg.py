"""WireGuard figures: tunnel throughput per backend, and node key rotations under live flows.

- ``wg.iperf_ratio_<backend>``: iperf3 TCP throughput between two nodes' workload addresses, through the
  tunnel (``wg.iperf_gbps_<backend>``), against the same nodes' underlay addresses over the same veths
  and bridge (``wg.iperf_plain_gbps_<backend>``), alternating, medians of ROUNDS runs each. The nodes are
  :class:`tests.privileged.wgmesh.Mesh`, keyed and routed by authd's own code. ``userspace`` is
  wireguard-go; ``kernel`` is measured only where this kernel can create a wireguard link.
- ``wg.rotation_ms``: a two-node cluster of real ``authd run`` nodes with ``mode = "wireguard"``
  (:mod:`authd.devcluster`, whichever backend ``auto`` picks). The rotation is asked for as ``authd
  encryption rotate`` asks (the control socket's ``encryption-rotate``, without the CLI's interpreter
  start); the figure runs from that request to the moment node-b's device itself (its UAPI socket, or
  ``wg`` for the kernel backend) holds node-a's new public key with a handshake completed since the
  request: both ends on the new keys (a handshake completes only when both hold it and the same
  preshared key). Polled every POLL seconds; median and maximum of ROTATIONS.
  ``wg.rotation_answer_ms``: from the same request to node-a's answer (its new key installed and sent).
- ``wg.rotation_lost_packets`` (goal 0): those ROTATIONS, a GAP apart, run while a sequence-numbered UDP
  flow (:mod:`bench.udpflow`) of UDP_RATE datagrams a second goes from the workload address on node-a to
  the workload's echo server on node-b; datagrams whose echo never came back (lost either way).
- ``wg.rotation_tcp_retransmits`` (goal 0): ROTATIONS more, under a TCP echo flow between the same
  workloads instead; the segments retransmitted meanwhile (``TcpRetransSegs`` in both workloads'
  namespaces). ``wg.rotation_tcp_ms``: those rotations' median time to both ends on the new key.

Needs root (network namespaces, TUN, BPF); prints a note and returns nothing otherwise.
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from authd import log
from authd.control import ControlClient, socket_path
from authd.datapath.netns import run_in_netns
from authd.devcluster.cluster import UDP_PORT, ClusterSpec, DevCluster, Rule, WorkloadSpec
from authd.encryption import kernel
from authd.encryption.device import DeviceStatus
from authd.encryption.keys import PublicKey
from authd.encryption.uapi import UapiClient
from bench import iperf
from bench.figures import Figures, figure, median
from bench.udpflow import UdpFlow
from tests.privileged.wgmesh import NAMES, WIREGUARD_GO, Mesh, underlay, workload

NETNS = Path("/run/netns")
ROUNDS = 3
ROTATIONS = 10
GAP = 1.0
"""Seconds between the end of one rotation and the next request."""
LEAD = 1.0
"""Seconds the flows run before the first rotation."""
UDP_RATE = 1000
POLL = 0.01
ROTATION_TIMEOUT = 10.0
SENDER, RECEIVER = "sender", "receiver"


def run() -> Figures:
    """Throughput on each backend this machine has, then the rotations on a real cluster."""
    if os.geteuid() != 0:
        print("bench: wg needs root; skipped")
        return {}
    log.configure("warning", "console")
    figures: Figures = {}
    for backend in _backends():
        figures.update(_iperf(backend))
    figures.update(_rotations())
    return figures


def _backends() -> list[str]:
    """The WireGuard backends this machine can run: wireguard-go if installed, kernel if the kernel can."""
    found = ["userspace"] if WIREGUARD_GO.exists() else []
    probe = f"awgprobe-{secrets.token_hex(2)}"  # outside "awgb", which the cluster sweeps
    subprocess.run(["ip", "netns", "add", probe], check=True)
    try:
        if run_in_netns(NETNS / probe, kernel.available):  # in a namespace of its own: no stray link
            found.append("kernel")
    finally:
        subprocess.run(["ip", "netns", "del", probe], check=True)
    return found


# ----------------------------------------------------------------------------------------- iperf


def _iperf(backend: str) -> Figures:
    """Node A to node B, alternating the underlay and the tunnel, in one mesh."""
    a, b = NAMES[0], NAMES[1]
    with tempfile.TemporaryDirectory(prefix="awgmesh-") as runtime:
        mesh = Mesh(backend, Path(runtime))
        try:
            client = mesh.path(mesh.members[a].netns)
            with iperf.server(mesh.path(mesh.members[b].netns)):
                plain, tunnel = [], []
                for _ in range(ROUNDS):
                    plain.append(iperf.throughput(client, underlay(1), source=underlay(0)))
                    tunnel.append(iperf.throughput(client, workload(1), source=workload(0)))
        finally:
            mesh.close()
    return {
        f"wg.iperf_ratio_{backend}": figure(median(tunnel) / median(plain), "ratio"),
        f"wg.iperf_gbps_{backend}": figure(median(tunnel) / 1e9, "Gbit/s"),
        f"wg.iperf_plain_gbps_{backend}": figure(median(plain) / 1e9, "Gbit/s"),
    }


# -------------------------------------------------------------------------------------- rotation


def spec() -> ClusterSpec:
    """One workload per node; node-b requires authentication of the sender, as a real policy would."""
    return ClusterSpec(
        workloads=(WorkloadSpec(SENDER, "node-a", 2301), WorkloadSpec(RECEIVER, "node-b", 2302)),
        rules=(Rule(SENDER, RECEIVER),),
        prefix="awgb",
        encryption=True,
    )


def _rotations() -> Figures:
    """ROTATIONS of node-a's key under a UDP flow, then ROTATIONS more under a TCP flow, node-a to node-b.

    One flow at a time, so neither helps the other: TCP's retransmissions send packets from node-b, which
    can start a handshake that the UDP flow alone (node-b only echoes it) would wait for.
    """
    with DevCluster(spec()) as cluster:
        for node in cluster.spec.nodes:
            cluster.wait_for(lambda n=node: len(_encryption(cluster, n)["peers"]) == 1, 30, f"{node}'s peer")  # type: ignore[misc]
        cluster.wait_for_entry("node-b", RECEIVER, SENDER)
        device_b = _device(cluster, "node-b")
        figures = _under_udp(cluster, device_b)
        figures.update(_under_tcp(cluster, device_b))
    return figures


def _under_udp(cluster: DevCluster, device_b: Callable[[], DeviceStatus]) -> Figures:
    address = cluster.address(SENDER)
    sock = run_in_netns(NETNS / cluster.workload(SENDER).netns, lambda: _bound(address))
    with UdpFlow(sock, (cluster.address(RECEIVER), UDP_PORT), UDP_RATE) as udp:
        time.sleep(LEAD)
        took, answered = _rotate_all(cluster, device_b)
    return {
        "wg.rotation_ms": figure(median(took) * 1000, "ms"),
        "wg.rotation_max_ms": figure(max(took) * 1000, "ms"),
        "wg.rotation_answer_ms": figure(median(answered) * 1000, "ms"),
        "wg.rotation_lost_packets": figure(udp.lost, f"datagrams of {udp.sent} in {ROTATIONS} rotations"),
    }


def _under_tcp(cluster: DevCluster, device_b: Callable[[], DeviceStatus]) -> Figures:
    tcp = cluster.start_tcp(SENDER, RECEIVER, interval=0.005)
    try:
        time.sleep(LEAD)
        before = _tcp_retransmits(cluster)
        took, _ = _rotate_all(cluster, device_b)
        retransmitted = _tcp_retransmits(cluster) - before
    finally:
        flow = cluster.finish(tcp)
    if not flow["connected"] or "error" in flow:
        raise RuntimeError(f"bench: the TCP flow failed: {flow}")
    return {
        "wg.rotation_tcp_ms": figure(median(took) * 1000, "ms"),
        "wg.rotation_tcp_retransmits": figure(retransmitted, f"segments in {ROTATIONS} rotations"),
    }


def _rotate_all(cluster: DevCluster, device_b: Callable[[], DeviceStatus]) -> tuple[list[float], list[float]]:
    """ROTATIONS, GAP apart: each one's seconds to both ends on the new key, and to node-a's answer."""
    took, answered = [], []
    for _ in range(ROTATIONS):
        both_ends, answer = _rotate(cluster, device_b)
        took.append(both_ends)
        answered.append(answer)
        time.sleep(GAP)
    return took, answered


def _bound(address: str) -> socket.socket:
    """A UDP socket bound to ``address`` (a workload's), in the calling thread's namespace."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((address, 0))
    return sock


def _control(cluster: DevCluster, node: str, *, timeout: float = 10.0) -> ControlClient:
    """The control socket of the node's authd, which ``authd`` commands talk to."""
    return ControlClient(socket_path(cluster.workdir / node / "run"), timeout=timeout)


def _encryption(cluster: DevCluster, node: str) -> dict[str, Any]:
    """The ``encryption`` part of the node's status report (``authd encryption status --json``)."""
    for report in _control(cluster, node).request("status"):
        encryption: dict[str, Any] = report["encryption"]
        return encryption
    raise RuntimeError(f"bench: {node}'s authd sent no status")


def _device(cluster: DevCluster, node: str) -> Callable[[], DeviceStatus]:
    """A reader of the node's WireGuard device as the device reports itself, not as authd does."""
    encryption = _encryption(cluster, node)
    interface = encryption["interface"]
    if encryption["backend"] == "userspace":
        pid = int((cluster.workdir / node / "run" / f"wireguard-go.{interface}.pid").read_text())
        return UapiClient(Path(f"/proc/{pid}/root/run/wireguard/{interface}.sock")).get
    netns = NETNS / cluster.network.nodes[node].netns
    return lambda: run_in_netns(netns, kernel.KernelWireGuard(interface).status)


def _rotate(cluster: DevCluster, device_b: Callable[[], DeviceStatus]) -> tuple[float, float]:
    """Rotate node-a's key once.

    Return the seconds until node-b's device held the new key with a handshake since the request, and
    the seconds until node-a's authd answered it.
    """
    (old,) = [peer.public_key for peer in device_b().peers]
    answers: list[tuple[float, dict[str, Any]]] = []

    def ask() -> None:
        for answer in _control(cluster, "node-a", timeout=30.0).request("encryption-rotate"):
            answers.append((time.monotonic(), answer))
            return

    asking = threading.Thread(target=ask)
    since, started = time.time(), time.monotonic()
    asking.start()
    try:
        while (new := _rotated_peer(device_b(), old, since)) is None:
            if time.monotonic() - started > ROTATION_TIMEOUT:
                raise RuntimeError(f"bench: node-b did not meet node-a's new key in {ROTATION_TIMEOUT}s")
            time.sleep(POLL)
        took = time.monotonic() - started
    finally:
        asking.join()
    if not answers or answers[0][1]["public_key"] != str(new):
        raise RuntimeError(f"bench: node-b holds {new}, but node-a answered the rotation with {answers}")
    return took, answers[0][0] - started


def _rotated_peer(status: DeviceStatus, old: PublicKey, since: float) -> PublicKey | None:
    """The peer key other than ``old`` with a handshake completed at or after ``since`` (Unix time)."""
    for peer in status.peers:
        if peer.public_key != old and peer.last_handshake is not None and peer.last_handshake >= since:
            return peer.public_key
    return None


def _tcp_retransmits(cluster: DevCluster) -> int:
    """``TcpRetransSegs`` summed over both workloads' namespaces (/proc/net/snmp)."""
    total = 0
    for name in (SENDER, RECEIVER):
        text = run_in_netns(
            NETNS / cluster.workload(name).netns, Path("/proc/thread-self/net/snmp").read_text
        )
        header, values = [line.split() for line in text.splitlines() if line.startswith("Tcp:")]
        total += int(values[header.index("RetransSegs")])
    return total
