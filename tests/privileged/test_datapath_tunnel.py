"""The tunnel binding on crafted frames (BPF_PROG_TEST_RUN): with ``tunnel_ifindex`` set, a remote
workload's packet passes only if it entered the node through the tunnel, and flows say encrypted.

The skb is on the loopback device (ifindex 1), which plays workload A's interface; ``ingress_ifindex``
says where a packet entered the node: the tunnel, the underlay or another workload's interface (made-up
ifindexes). Real WireGuard, and flows leaving through the tunnel, are in test_encryption_tunnel.py.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from ipaddress import ip_network

import pytest

from authd.backoff import BackoffPolicy
from authd.config.model import DatapathConfig
from authd.datapath import clock, syscalls
from authd.datapath.enforcement import Enforcement
from authd.datapath.events import FlowEvent, decode
from authd.datapath.layout import (
    ENDPOINT_F_ROUTE,
    AuthType,
    Direction,
    DropReason,
    FlowLevel,
    ProgramName,
    Verdict,
)
from authd.datapath.loader import Datapath
from authd.datapath.maps import AuthKey, EndpointOwner, IpcacheEntry, PinnedMaps, PolicyKey, RuntimeConfig
from authd.datapath.ringbuf import RingBuffer
from authd.errors import DatapathError
from authd.health import Health
from tests.fakes import packets as pk

pytestmark = pytest.mark.privileged

PASS, DROP = -1, 2
LO, OTHER, UPLINK, TUNNEL = 1, 77, 5, 9  # workload A's interface, B's, the underlay, the tunnel
A4, B4, R4, W4 = "10.1.0.1", "10.1.0.2", "10.2.0.9", "192.0.2.9"  # A, B here; R on node 3; W the world
A6, R6 = "fd00:1::1", "fd00:2::9"
A, B, R = 300, 400, 500
NODE_R = 3


class Node:
    """Test runs of the programs, the tunnel's ifindex made up as the other interfaces' are."""

    tunnel = TUNNEL

    def __init__(self, datapath: Datapath) -> None:
        self.datapath = datapath

    def run(self, program: ProgramName, frame: bytes, *, entered: int) -> int:
        fd = self.datapath.prog_fd(program)
        return syscalls.prog_test_run(fd, frame, ingress_ifindex=entered).retval

    def to_a(self, frame: bytes, entered: int) -> int:
        """Delivered to workload A after entering the node through ``entered``."""
        return self.run(ProgramName.EGRESS, frame, entered=entered)

    def from_a(self, frame: bytes) -> int:
        """Sent by workload A (the ingress hook of its interface)."""
        return self.run(ProgramName.INGRESS, frame, entered=LO)


@pytest.fixture
def node(datapath: Datapath, maps: PinnedMaps) -> Node:
    maps.endpoints.update_many(
        {
            ip_network(A4): EndpointOwner(LO, ENDPOINT_F_ROUTE),
            ip_network(A6): EndpointOwner(LO, ENDPOINT_F_ROUTE),
            ip_network(B4): EndpointOwner(OTHER, ENDPOINT_F_ROUTE),
        }
    )
    maps.ipcache.update_many(
        {
            ip_network(A4): IpcacheEntry(A, 0),
            ip_network(A6): IpcacheEntry(A, 0),
            ip_network(B4): IpcacheEntry(B, 0),
            ip_network("10.2.0.0/24"): IpcacheEntry(R, NODE_R),
            ip_network("fd00:2::/64"): IpcacheEntry(R, NODE_R),
        }
    )
    # A accepts R only authenticated, and R at node 3 is: the entry WireGuard must back.
    maps.policy.update_many({PolicyKey(A, R, Direction.INGRESS): AuthType.SPIRE})
    maps.auth.update_many({AuthKey(A, R, NODE_R): datetime.now(UTC) + timedelta(minutes=5)})
    return Node(datapath)


def tunnel(datapath: Datapath, ifindex: int, level: FlowLevel = FlowLevel.FIRST) -> None:
    datapath.configure(RuntimeConfig(level, 10**9, ifindex))


def flows(ring: RingBuffer) -> list[FlowEvent]:
    return [e for r in ring.read() if isinstance(e := decode(r, clock.tai_offset_ns()), FlowEvent)]


@pytest.mark.parametrize(("remote", "local"), [(R4, A4), (R6, A6)], ids=["ipv4", "ipv6"])
def test_a_remote_workloads_packet_passes_only_through_the_tunnel(
    datapath: Datapath, node: Node, maps: PinnedMaps, ring: RingBuffer, remote: str, local: str
) -> None:
    tunnel(datapath, node.tunnel)
    frame = pk.tcp_frame(remote, local)
    # The auth entry (A, R, node 3) is live: without the binding each of these would pass.
    assert node.to_a(frame, entered=UPLINK) == DROP  # injected on the underlay, in clear
    assert node.to_a(frame, entered=0) == DROP  # sent by the node itself
    assert node.to_a(frame, entered=OTHER) == DROP  # from a local workload's interface
    counters = maps.counters.read()
    assert counters["denied_not_encrypted"] == 3
    assert counters["allowed_auth"] == 0
    assert maps.verdicts.read_by_direction()["denied_not_encrypted", Direction.INGRESS] == 3
    dropped = flows(ring)
    assert [(e.verdict, e.drop_reason, e.encrypted, str(e.src)) for e in dropped] == [
        (Verdict.DENIED, DropReason.NOT_ENCRYPTED, False, remote)
    ]  # one event per flow and reason
    # The same packet, decrypted by WireGuard: the auth entry decides, and the flow says encrypted.
    assert node.to_a(frame, entered=node.tunnel) == PASS
    assert maps.counters.read()["allowed_auth"] == 1
    (passed,) = flows(ring)
    assert (passed.verdict, passed.encrypted, passed.direction) == (Verdict.ALLOWED, True, Direction.INGRESS)


def test_without_a_tunnel_the_auth_entry_decides_as_before(
    datapath: Datapath, node: Node, maps: PinnedMaps, ring: RingBuffer
) -> None:
    tunnel(datapath, 0)
    assert node.to_a(pk.tcp_frame(R4, A4), entered=UPLINK) == PASS
    (event,) = flows(ring)
    assert (event.verdict, event.encrypted) == (Verdict.ALLOWED, False)
    maps.auth.flush()
    assert node.to_a(pk.tcp_frame(R4, A4, sport=40001), entered=UPLINK) == DROP
    (event,) = flows(ring)
    assert event.drop_reason is DropReason.AUTH_REQUIRED
    assert maps.counters.read()["denied_not_encrypted"] == 0


def test_the_tunnel_binds_only_remote_workloads(datapath: Datapath, node: Node, maps: PinnedMaps) -> None:
    tunnel(datapath, node.tunnel)
    assert node.to_a(pk.tcp_frame(W4, A4), entered=UPLINK) == PASS  # the world: not in cluster state
    assert node.to_a(pk.tcp_frame(B4, A4), entered=OTHER) == PASS  # a workload of this node
    assert node.from_a(pk.tcp_frame(A4, R4)) == PASS  # A's own packets go out as before
    assert maps.counters.read()["denied_not_encrypted"] == 0


def test_an_established_flow_is_bound_to_the_tunnel_both_ways(
    datapath: Datapath, node: Node, maps: PinnedMaps
) -> None:
    tunnel(datapath, node.tunnel)
    assert node.to_a(pk.tcp_frame(R4, A4), entered=node.tunnel) == PASS
    ack = pk.tcp_frame(R4, A4, flags=pk.ACK)
    assert node.to_a(ack, entered=node.tunnel) == PASS
    assert maps.counters.read()["established"] == 1
    assert node.to_a(ack, entered=UPLINK) == DROP  # the flow's entry does not vouch for it
    # A connection A opened: its replies too must come through the tunnel.
    assert node.from_a(pk.tcp_frame(A4, R4, sport=41000, dport=22)) == PASS
    reply = pk.tcp_frame(R4, A4, sport=22, dport=41000, flags=pk.ACK)
    assert node.to_a(reply, entered=UPLINK) == DROP
    assert node.to_a(reply, entered=node.tunnel) == PASS
    assert maps.counters.read()["denied_not_encrypted"] == 2


def test_a_tunnel_set_later_binds_established_flows_at_once(
    datapath: Datapath, node: Node, maps: PinnedMaps
) -> None:
    tunnel(datapath, 0)
    ack = pk.tcp_frame(R4, A4, flags=pk.ACK)
    assert node.to_a(pk.tcp_frame(R4, A4), entered=UPLINK) == PASS
    assert node.to_a(ack, entered=UPLINK) == PASS  # established, in clear
    tunnel(datapath, node.tunnel)
    assert node.to_a(ack, entered=UPLINK) == DROP  # at once, not at the flow's re-check
    assert node.to_a(ack, entered=node.tunnel) == PASS
    assert maps.counters.read()["denied_not_encrypted"] == 1


def test_the_config_map_holds_the_tunnel(datapath: Datapath, node: Node) -> None:
    tunnel(datapath, node.tunnel, FlowLevel.DENIED)
    assert datapath.runtime_config() == RuntimeConfig(FlowLevel.DENIED, 10**9, node.tunnel)


def test_the_tunnel_set_through_enforcement_survives_reloads_and_restarts(
    datapath: Datapath, node: Node
) -> None:
    def enforcement() -> Enforcement:
        made = Enforcement(
            DatapathConfig(flow_events="first"),
            Health().register("datapath"),
            on_auth_required=lambda _event: None,
            on_flow=lambda _event: None,
            backoff=BackoffPolicy(),
        )
        made.datapath = datapath  # as its `datapath` job sets it once loaded
        return made

    running = enforcement()
    running.set_tunnel(TUNNEL)
    assert datapath.runtime_config().tunnel_ifindex == TUNNEL
    running.reload(DatapathConfig(flow_events="all"))  # a config reload keeps it
    assert datapath.runtime_config() == RuntimeConfig(FlowLevel.ALL, 10**9, TUNNEL)
    assert node.to_a(pk.tcp_frame(R4, A4), entered=UPLINK) == DROP
    # A restarted authd, not told yet: it keeps what the pinned map holds (the binding stays closed).
    restarted = enforcement()
    restarted.reload(DatapathConfig(flow_events="denied"))
    assert datapath.runtime_config() == RuntimeConfig(FlowLevel.DENIED, 10**9, TUNNEL)
    restarted.set_tunnel(0)
    assert datapath.runtime_config().tunnel_ifindex == 0
    assert node.to_a(pk.tcp_frame(R4, A4, sport=40002), entered=UPLINK) == PASS
    with pytest.raises(DatapathError, match="tunnel ifindex"):
        restarted.set_tunnel(2**32)
