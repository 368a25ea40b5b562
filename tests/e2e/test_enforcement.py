"""A two-node cluster enforcing policy: registered pairs pass from the first SYN, strangers are denied,
an authd killed with SIGKILL and restarted loses no packet of a running flow (nor the flows it had seen),
and a workload registered at run time connects without a drop.

The cluster is dual stack: the same checks pass over IPv4 and IPv6; then again, over IPv4, with pods
made through CNI. SVIDs live an hour here, so that
nothing rotates under these tests (test_svid_lifetimes covers rotation).
"""

from __future__ import annotations

import json
import signal
import socket
import time
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest

from authd.datapath import tcx
from authd.datapath.loader import attached_prog_ids
from authd.datapath.netns import run_in_netns
from authd.devcluster import readings
from authd.devcluster.cluster import ClusterSpec, DevCluster, Rule, WorkloadSpec
from authd.hubble._proto import flow_pb2, observer_pb2
from authd.hubble.query import GET_FLOWS, Query, flows
from tests.e2e.checks import assert_lossless, connection_flows, denied

pytestmark = [pytest.mark.privileged, pytest.mark.e2e]

SPEC = ClusterSpec(
    workloads=(
        WorkloadSpec("frontend", "node-a", 2101),
        WorkloadSpec("intruder", "node-a", 2102, registered=False),
        WorkloadSpec("late", "node-a", 2103, registered=False),
        WorkloadSpec("backend", "node-b", 2201),
        WorkloadSpec("db", "node-b", 2202),
    ),
    rules=(Rule("*", "backend"), Rule("*", "db")),
    prefix="ae2",
    ipv6=True,
)
EVERY_SETUP = True  # again with pods made by ptp, host-local and authd-cni, and again on etcd
FAMILIES = pytest.mark.parametrize("family", [4, 6], ids=["ipv4", "ipv6"])


@FAMILIES
@pytest.mark.parametrize(
    ("client", "server"),
    [("frontend", "backend"), ("frontend", "db"), ("backend", "db")],
    ids=["across-nodes", "across-nodes-2", "same-node"],
)
def test_registered_pair_is_allowed_from_its_first_syn(
    cluster: DevCluster, client: str, server: str, family: int
) -> None:
    cluster.wait_for_entry("node-b", server, client)
    before = denied(cluster, "node-b")

    report = cluster.tcp(client, server, duration=0.3, family=family)

    assert_lossless(report)
    flows = connection_flows(cluster, "node-b", client, report, family=family)
    syn = [f for f in flows if f["traffic_direction"] == "INGRESS" and readings.tcp_flags(f) == {"SYN"}]
    assert syn, flows
    assert syn[0]["verdict"] == "FORWARDED"
    assert syn[0]["auth_type"] == "SPIRE"
    assert syn[0]["policy_match_type"] == 1  # L3-Only: a policy entry for the identity pair
    assert readings.spiffe_id(syn[0]["source"]) == SPEC.spiffe_id(client)
    assert readings.spiffe_id(syn[0]["destination"]) == SPEC.spiffe_id(server)
    assert not [f for f in flows if f["verdict"] == "DROPPED"]
    assert denied(cluster, "node-b") == before


def test_observe_prints_the_allowed_syn_the_hubble_way(cluster: DevCluster) -> None:
    cluster.wait_for_entry("node-b", "backend", "frontend")
    report = cluster.tcp("frontend", "backend")
    connection_flows(cluster, "node-b", "frontend", report)

    source = f"{cluster.workload('frontend').address}:{report['local_port']} "
    lines = [line for line in cluster.observe("node-b") if source in line]

    assert any(
        f"{source}(ID:{SPEC.spiffe_id('frontend')}) -> " in line
        and "policy-verdict:L3-Only INGRESS ALLOWED (TCP Flags: SYN; Auth: SPIRE)" in line
        for line in lines
    ), lines


@FAMILIES
def test_registered_pair_exchanges_udp_from_the_first_datagram(cluster: DevCluster, family: int) -> None:
    cluster.wait_for_entry("node-b", "backend", "frontend")
    before = denied(cluster, "node-b")

    report = cluster.udp("frontend", "backend", count=20, family=family)

    assert report["lost"] == 0, report
    assert report["first_echoed"], report
    assert denied(cluster, "node-b") == before


@FAMILIES
def test_unregistered_workload_is_denied_auth_required(cluster: DevCluster, family: int) -> None:
    before = cluster.counters("node-b")

    report = cluster.tcp("intruder", "backend", connect_timeout=1.5, family=family)

    assert not report["connected"], report
    flows = connection_flows(cluster, "node-b", "intruder", report, family=family)
    assert flows
    assert all(f["verdict"] == "DROPPED" for f in flows), flows
    assert {f["drop_reason_desc"] for f in flows} == {"AUTH_REQUIRED"}
    assert flows[0]["source"]["identity"] == 2  # world: SPIRE and cluster state do not know it
    assert flows[0]["source"]["labels"] == ["reserved:world"]
    assert readings.tcp_flags(flows[0]) == {"SYN"}
    syns = 1 + report["syn_retrans"]
    after = cluster.counters("node-b")
    assert after["denied_auth_required"] - before["denied_auth_required"] == syns
    assert after["allowed_auth"] == before["allowed_auth"]


@FAMILIES
def test_unregistered_workload_udp_is_dropped(cluster: DevCluster, family: int) -> None:
    before = cluster.counters("node-b")

    report = cluster.udp("intruder", "backend", count=5, family=family)

    assert report["echoed"] == 0, report
    assert cluster.counters("node-b")["denied_auth_required"] - before["denied_auth_required"] == 5


def test_authd_killed_and_restarted_under_a_flow_loses_no_packet(cluster: DevCluster) -> None:
    cluster.wait_for_entry("node-b", "backend", "frontend")
    before = {node: denied(cluster, node) for node in ("node-a", "node-b")}
    flow = cluster.start_tcp("frontend", "backend")
    try:
        time.sleep(0.5)
        for node in ("node-b", "node-a"):  # the enforcing node first, then the attested one
            assert cluster.stop_authd(node, signal.SIGKILL) == -signal.SIGKILL
            time.sleep(1.0)  # enforcement goes on from the pinned maps while authd is down
            cluster.start_authd(node)
            time.sleep(1.0)  # and after the restart, while the new authd takes over its maps
    finally:
        report = cluster.finish(flow)

    assert_lossless(report)
    assert report["sent"] > 150, report  # it ran through both restarts
    assert {node: denied(cluster, node) for node in ("node-a", "node-b")} == before
    # The flow log restarted with node-b's authd; a verdict change on the connection would be in it.
    frontend = str(cluster.workload("frontend").address)
    assert not readings.from_source(cluster.flows("node-b", "--verdict", "denied"), frontend)
    # Its SYN, seen before the kill, is still there: the new authd read its flow history back from disk.
    since = cluster.flows("node-b", "--since", "10m", "--from-ip", frontend)
    (syn,) = [
        f
        for f in readings.from_source(since, frontend, report["local_port"])
        if readings.tcp_flags(f) == {"SYN"}
    ]
    assert syn["verdict"] == "FORWARDED"
    cluster.wait_for_entry("node-b", "backend", "frontend")  # the restarted authd keeps the entry


def test_workload_registered_at_run_time_connects_without_a_drop(cluster: DevCluster) -> None:
    assert cluster.pair_key("node-b", "backend", "late") is None
    before = denied(cluster, "node-b")

    cluster.register("late")
    # As an operator's rollout would: wait until the node enforcing policy holds the pair.
    cluster.wait_for_entry("node-b", "backend", "late", timeout=20)
    report = cluster.tcp("late", "backend")

    assert_lossless(report)
    flows = connection_flows(cluster, "node-b", "late", report)
    syn = next(f for f in flows if readings.tcp_flags(f) == {"SYN"})
    assert syn["verdict"] == "FORWARDED"
    assert readings.spiffe_id(syn["source"]) == SPEC.spiffe_id("late")
    assert denied(cluster, "node-b") == before


def test_get_flows_follows_with_filters_and_reads_both_nodes(cluster: DevCluster) -> None:
    """Hubble's GetFlows against the running daemons: follow with a whitelist, then both nodes merged."""
    intruder = cluster.address("intruder")
    request = Query(follow=True, verdicts=["DROPPED"], from_ip=[intruder]).to_request(datetime.now(UTC))
    with grpc.insecure_channel(f"unix:{cluster.hubble_socket('node-b')}") as channel:
        get_flows = channel.unary_stream(
            GET_FLOWS,
            request_serializer=observer_pb2.GetFlowsRequest.SerializeToString,
            response_deserializer=observer_pb2.GetFlowsResponse.FromString,
        )
        # Followed until the deadline: everything the stream brought in that time is checked.
        call = get_flows(request, timeout=8)
        cluster.tcp("frontend", "backend", duration=0.2)  # allowed: not on the whitelist
        report = cluster.tcp("intruder", "backend", connect_timeout=1.5)  # the SYN and its retransmits
        followed: list[observer_pb2.GetFlowsResponse] = []
        with pytest.raises(grpc.RpcError) as ended:
            followed.extend(call)
    assert ended.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    # Exactly the intruder's SYNs, each one reported (the first and every retransmission), and no other.
    assert len(followed) == 1 + int(report["syn_retrans"]), followed
    for response in followed:
        flow = response.flow
        assert response.node_name == "node-b"
        assert (flow.verdict, flow.drop_reason_desc) == (flow_pb2.DROPPED, flow_pb2.AUTH_REQUIRED)
        assert (flow.IP.source, flow.l4.TCP.source_port) == (intruder, report["local_port"])
        assert flow.l4.TCP.flags.SYN
        assert not flow.l4.TCP.flags.ACK

    sockets = [str(cluster.hubble_socket(node)) for node in ("node-a", "node-b")]
    since = Query(since="5m", from_ip=[intruder], verdicts=["DROPPED"]).to_request(datetime.now(UTC))
    merged = list(flows(sockets, since))
    assert merged
    assert {r.node_name for r in merged} == {"node-b"}  # node-a enforces nothing for backend
    times = [r.time.ToNanoseconds() for r in merged]
    assert times == sorted(times)


def tcx_links(index: int) -> list[int]:
    """The link ids on both tcx hooks of an interface (the calling thread's netns)."""
    return [e.link_id for hook in (tcx.BPF_TCX_INGRESS, tcx.BPF_TCX_EGRESS) for e in tcx.query(index, hook)]


def test_a_pod_made_while_authd_is_down_is_enforced_from_its_first_packet(cluster: DevCluster) -> None:
    if not cluster.spec.cni:
        pytest.skip("pods are made through CNI only with ClusterSpec(cni=True)")
    workload = cluster.network.workloads["intruder"]
    node = workload.node
    cluster.stop_authd(node.name)
    try:
        cluster.pods["intruder"].delete("intruder", Path("/run/netns") / workload.netns)
        pod = cluster.add_pod("intruder")  # a new veth, with no daemon to attach it
        index = run_in_netns(Path("/run/netns") / node.netns, lambda: socket.if_nametoindex(pod.host_link))
        progs = run_in_netns(Path("/run/netns") / node.netns, lambda: attached_prog_ids(index))
        assert None not in progs
        links = run_in_netns(Path("/run/netns") / node.netns, lambda: tcx_links(index))
        assert len(links) == 2
        with cluster.maps(node.name) as maps:
            owner = maps.endpoints.get(f"{pod.address}/32")
        assert owner is not None
        assert owner.ifindex == index
        before = cluster.counters("node-b")
        report = cluster.tcp("intruder", "backend", connect_timeout=1.5)
        assert not report["connected"], report
        assert cluster.counters("node-b")["denied_auth_required"] > before["denied_auth_required"]
    finally:
        cluster.start_authd(node.name)
    # The daemon's link watcher matches the veth too: it swaps its new programs into the same links.
    assert run_in_netns(Path("/run/netns") / node.netns, lambda: tcx_links(index)) == links
    assert None not in run_in_netns(Path("/run/netns") / node.netns, lambda: attached_prog_ids(index))
    report = json.loads(cluster.authd(node.name, "status", "--json"))
    assert pod.host_link in report["datapath"]["interfaces"]
    assert report["datapath"]["programs_ahead"] == {}
