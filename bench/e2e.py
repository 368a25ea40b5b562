"""End-to-end figures on a two-node cluster on this machine (authd/devcluster): drops before authentication.

- ``e2e.first_packet_drops``: packets the enforcing node's datapath denied for pairs registered before
  they sent anything, over CONNECTIONS fresh connections (its denied counters, which nothing else moves
  meanwhile); ``e2e.first_packet_syn_retransmissions``: the SYNs those clients had to resend. The goal
  of both is 0: a known pair is authenticated before its first packet.
- ``e2e.time_to_auth_ms``: a workload that is not registered sends a SYN, which is dropped; it is
  registered (cluster state and SPIRE, as an operator would) as soon as the datapath counted that drop;
  the figure runs from the drop's flow-event timestamp (the kernel's clock) to the moment its auth entry
  is present in the enforcing node's map. ``e2e.time_to_auth_after_register_ms`` starts at the
  registration instead, so the two show what reacting to the drop costs. Medians over LATE workloads;
  ``e2e.time_to_connect_ms``: the same clients' connect time (TCP's SYN backoff adds to it).

Needs root (network namespaces, BPF); prints a note and returns nothing otherwise.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from datetime import UTC, datetime

from authd import log
from authd.devcluster import readings
from authd.devcluster.cluster import ClusterSpec, DevCluster, Rule, WorkloadSpec
from bench.figures import Figures, figure, median

CONNECTIONS = 12
LATE = 5
PREFIX = "ae2b"
CLIENTS = ("frontend", "peer", "db")  # two on the other node, one on the enforcing node itself


def spec() -> ClusterSpec:
    """Workload backend (node-b) requires authentication from everyone; the late ones are not registered."""
    late = tuple(WorkloadSpec(f"late{i}", "node-a", 2310 + i, registered=False) for i in range(LATE))
    return ClusterSpec(
        workloads=(
            WorkloadSpec("frontend", "node-a", 2301),
            WorkloadSpec("peer", "node-a", 2302),
            *late,
            WorkloadSpec("backend", "node-b", 2401),
            WorkloadSpec("db", "node-b", 2402),
        ),
        rules=(Rule("*", "backend"),),
        prefix=PREFIX,
    )


def run() -> Figures:
    """Build one cluster, measure both figures, tear it down."""
    if os.geteuid() != 0:
        print("bench: e2e needs root; skipped")
        return {}
    log.configure("warning", "console")
    with DevCluster(spec()) as cluster:
        figures = _first_packet(cluster)
        figures.update(_time_to_auth(cluster))
    return figures


def _first_packet(cluster: DevCluster) -> Figures:
    for client in CLIENTS:
        cluster.wait_for_entry("node-b", "backend", client)
    drops = retransmissions = 0
    for index in range(CONNECTIONS):
        client = CLIENTS[index % len(CLIENTS)]
        before = readings.denied(cluster.counters("node-b"))
        report = cluster.tcp(client, "backend", duration=0.05)
        if not report["connected"]:
            raise RuntimeError(f"bench: {client} could not connect to backend: {report}")
        drops += readings.denied(cluster.counters("node-b")) - before
        retransmissions += int(report["syn_retrans"])
    return {
        "e2e.first_packet_drops": figure(drops, f"packets in {CONNECTIONS} connections"),
        "e2e.first_packet_syn_retransmissions": figure(retransmissions, f"SYNs in {CONNECTIONS} connections"),
    }


def _time_to_auth(cluster: DevCluster) -> Figures:
    from_drop: list[float] = []
    from_register: list[float] = []
    connect: list[float] = []
    for index in range(LATE):
        workload = f"late{index}"
        before = cluster.counters("node-b")["denied_auth_required"]
        flow = cluster.start_tcp(workload, "backend")
        cluster.wait_for(_counted_after(cluster, before), 10, f"{workload}'s first drop")
        registering = datetime.now(UTC)
        # Registration (cluster state, then `authd spire sync`) runs beside the wait for the entry: the
        # nodes act on the cluster state file before the sync command has returned.
        registration = threading.Thread(target=cluster.register, args=(workload,))
        registration.start()
        try:
            cluster.wait_for(_entry_present(cluster, workload), 30, f"{workload}'s auth entry")
            present = datetime.now(UTC)
        finally:
            registration.join()
        report = cluster.finish(flow)
        if not report["connected"]:
            raise RuntimeError(f"bench: {workload} never connected: {report}")
        from_drop.append((present - _first_drop(cluster, workload, report["local_port"])).total_seconds())
        from_register.append((present - registering).total_seconds())
        connect.append(float(report["connect_ms"]))
    return {
        "e2e.time_to_auth_ms": figure(median(from_drop) * 1000, "ms"),
        "e2e.time_to_auth_after_register_ms": figure(median(from_register) * 1000, "ms"),
        "e2e.time_to_connect_ms": figure(median(connect), "ms"),
    }


def _counted_after(cluster: DevCluster, before: int) -> Callable[[], bool]:
    return lambda: cluster.counters("node-b")["denied_auth_required"] > before


def _entry_present(cluster: DevCluster, workload: str) -> Callable[[], bool]:
    return lambda: cluster.auth_expiry("node-b", "backend", workload) is not None


def _first_drop(cluster: DevCluster, workload: str, port: int) -> datetime:
    """When the node-b datapath dropped the workload's first SYN (its flow event's timestamp)."""
    address = str(cluster.workload(workload).address)
    denied = [
        flow
        for flow in readings.from_source(cluster.flows("node-b", "--verdict", "DROPPED"), address, port)
        if flow["drop_reason_desc"] == "AUTH_REQUIRED"
    ]
    if not denied:
        raise RuntimeError(f"bench: no denied flow from {workload}:{port} on node-b")
    return datetime.fromisoformat(denied[0]["time"])
