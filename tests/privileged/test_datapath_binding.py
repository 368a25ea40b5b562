"""The programs on crafted frames (BPF_PROG_TEST_RUN): source binding, strict parsing, the flow table.

The test run's skb is on the loopback device (ifindex 1), which plays the workload interface; another
workload's interface is a made-up ifindex, and ``ingress_ifindex`` says where a packet entered the node.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from ipaddress import ip_network

import pytest

from authd.datapath import clock, syscalls
from authd.datapath.events import FlowEvent, decode
from authd.datapath.layout import (
    ENDPOINT_F_ROUTE,
    FLOW_RECHECK_NS,
    IDENTITY_ANY,
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
from tests.fakes import packets as pk

pytestmark = pytest.mark.privileged

PASS, DROP = -1, 2
LO, OTHER, UPLINK = 1, 77, 5  # this workload's interface, another workload's, the node's uplink
A4, B4, R4 = "10.1.0.1", "10.1.0.2", "192.0.2.9"  # A here, B on OTHER, R remote
A6, B6, R6 = "fd00:1::1", "fd00:1::2", "2001:db8::9"
A, B, R = 300, 400, 500
NODE_R = 3


def run(datapath: Datapath, frame: bytes, program: ProgramName, ingress_ifindex: int = 0) -> int:
    fd = datapath.prog_fd(program)
    return syscalls.prog_test_run(fd, frame, ingress_ifindex=ingress_ifindex).retval


def from_a(datapath: Datapath, frame: bytes) -> int:
    """The frame leaves workload A: the ingress hook of A's interface."""
    return run(datapath, frame, ProgramName.INGRESS, LO)


def to_a(datapath: Datapath, frame: bytes, entered: int = UPLINK) -> int:
    """The frame is delivered to workload A after entering the node through ``entered``."""
    return run(datapath, frame, ProgramName.EGRESS, entered)


@pytest.fixture
def node(maps: PinnedMaps) -> PinnedMaps:
    maps.endpoints.update_many(
        {
            ip_network(A4): EndpointOwner(LO, ENDPOINT_F_ROUTE),
            ip_network(A6): EndpointOwner(LO, ENDPOINT_F_ROUTE),
            ip_network(B4): EndpointOwner(OTHER, ENDPOINT_F_ROUTE),
            ip_network(B6): EndpointOwner(OTHER, ENDPOINT_F_ROUTE),
        }
    )
    maps.ipcache.update_many(
        {
            ip_network(A4): IpcacheEntry(A, 0),
            ip_network(A6): IpcacheEntry(A, 0),
            ip_network(B4): IpcacheEntry(B, 0),
            ip_network(B6): IpcacheEntry(B, 0),
            ip_network(R4): IpcacheEntry(R, NODE_R),
            ip_network(R6): IpcacheEntry(R, NODE_R),
        }
    )
    return maps


def flows(ring: RingBuffer) -> list[FlowEvent]:
    return [e for r in ring.read() if isinstance(e := decode(r, clock.tai_offset_ns()), FlowEvent)]


# ---------------------------------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    ("tpids", "verdict"),
    [
        ([], PASS),
        ([pk.ETH_P_8021Q], PASS),
        ([pk.ETH_P_8021Q, pk.ETH_P_8021Q], PASS),
        ([pk.ETH_P_8021AD, pk.ETH_P_8021Q], PASS),  # QinQ
        ([pk.ETH_P_8021Q] * 3, DROP),
        ([pk.ETH_P_8021AD, pk.ETH_P_8021Q, pk.ETH_P_8021Q], DROP),
        ([pk.ETH_P_8021Q] * 5, DROP),
    ],
    ids=["0", "1", "2", "qinq", "3", "qinq+1", "5"],
)
@pytest.mark.parametrize("program", [ProgramName.INGRESS, ProgramName.EGRESS])
def test_vlan_stacks_are_followed_to_a_depth_of_two_and_deeper_is_malformed(
    datapath: Datapath, node: PinnedMaps, tpids: list[int], verdict: int, program: ProgramName
) -> None:
    src, dst = (A4, R4) if program is ProgramName.INGRESS else (R4, A4)
    frame = pk.tagged(pk.ipv4(src, dst, pk.TCP, pk.tcp(1, 2)), pk.ETH_P_IP, tpids)
    assert run(datapath, frame, program, LO if program is ProgramName.INGRESS else UPLINK) == verdict
    counters = node.counters.read()
    assert counters["denied_malformed"] == (verdict == DROP)
    # Behind a followed stack the inner packet is judged: a spoofed source inside is still refused.
    spoofed = pk.tagged(pk.ipv4(B4, R4, pk.TCP, pk.tcp(1, 2)), pk.ETH_P_IP, tpids)
    assert from_a(datapath, spoofed) == DROP


@pytest.mark.parametrize("ethertype", [0x88CC, 0x8847, 0x9000, 0x0842], ids=["lldp", "mpls", "loop", "wol"])
def test_unknown_ethertypes_are_dropped(datapath: Datapath, node: PinnedMaps, ethertype: int) -> None:
    frame = pk.ethernet(b"\x00" * 46, ethertype)
    assert from_a(datapath, frame) == DROP
    assert to_a(datapath, frame) == DROP
    assert node.counters.read()["denied_unsupported"] == 2


def test_arp_that_is_not_ethernet_ipv4_is_malformed(datapath: Datapath, node: PinnedMaps) -> None:
    body = bytes(pk.arp_frame(A4, R4)[14:])
    assert from_a(datapath, pk.ethernet(b"\x00\x06" + body[2:], pk.ETH_P_ARP)) == DROP  # IEEE 802 hw
    assert from_a(datapath, pk.ethernet(body[:20], pk.ETH_P_ARP)) == DROP  # truncated
    assert node.counters.read()["denied_malformed"] == 2


# --------------------------------------------------------------------------------- source binding


@pytest.mark.parametrize(("spoofed", "dst"), [(B4, R4), (B6, R6), (R4, A4), ("10.9.9.9", R4)])
def test_a_workload_may_only_send_from_its_own_addresses(
    datapath: Datapath, node: PinnedMaps, ring: RingBuffer, spoofed: str, dst: str
) -> None:
    datapath.configure(RuntimeConfig(FlowLevel.DENIED, 10**9))
    own = A4 if "." in dst else A6
    assert from_a(datapath, pk.tcp_frame(own, dst if dst != A4 else R4)) == PASS
    assert from_a(datapath, pk.tcp_frame(spoofed, dst)) == DROP
    assert node.counters.read()["denied_source_not_owned"] == 1
    verdicts = node.verdicts.read_by_direction()  # counted by direction as well: out of the workload
    assert verdicts["denied_source_not_owned", Direction.EGRESS] == 1
    assert verdicts["denied_source_not_owned", Direction.INGRESS] == 0
    assert verdicts["allowed", Direction.EGRESS] == 1
    (event,) = flows(ring)
    assert (event.verdict, event.drop_reason, str(event.src)) == (
        Verdict.DENIED,
        DropReason.SOURCE_NOT_OWNED,
        spoofed,
    )


def test_link_local_sources_are_not_owned(datapath: Datapath, node: PinnedMaps) -> None:
    udp = pk.ethernet(pk.ipv6("fe80::1", "fe80::2", pk.UDP, pk.udp(5353, 5353)), pk.ETH_P_IPV6)
    assert from_a(datapath, udp) == DROP
    v4 = pk.ethernet(pk.ipv4("169.254.3.4", "169.254.3.5", pk.UDP, pk.udp(1, 2)), pk.ETH_P_IP)
    assert from_a(datapath, v4) == DROP
    # ... and delivered to a workload, an address it does not own is refused: a `* -> A` rule cannot
    # be walked around through A's link-local address.
    node.policy.update_many({PolicyKey(A, IDENTITY_ANY, Direction.INGRESS): AuthType.SPIRE})
    assert (
        to_a(datapath, pk.ethernet(pk.ipv6("fe80::2", "fe80::1", pk.UDP, pk.udp(1, 2)), pk.ETH_P_IPV6))
        == DROP
    )
    counters = node.counters.read()
    assert counters["denied_source_not_owned"] == 2
    assert counters["denied_destination_not_owned"] == 1


@pytest.mark.parametrize(("src", "dst"), [(B4, A4), (B6, A6)], ids=["ipv4", "ipv6"])
def test_a_local_endpoints_address_must_arrive_through_its_interface(
    datapath: Datapath, node: PinnedMaps, ring: RingBuffer, src: str, dst: str
) -> None:
    datapath.configure(RuntimeConfig(FlowLevel.DENIED, 10**9))
    frame = pk.tcp_frame(src, dst)
    assert to_a(datapath, frame, entered=OTHER) == PASS  # from B's own interface
    assert to_a(datapath, frame, entered=UPLINK) == DROP  # an underlay packet claiming B
    assert to_a(datapath, frame, entered=0) == DROP  # the node itself claiming B
    assert node.counters.read()["denied_source_wrong_interface"] == 2
    verdicts = node.verdicts.read_by_direction()
    assert verdicts["denied_source_wrong_interface", Direction.INGRESS] == 2
    assert verdicts["denied_source_wrong_interface", Direction.EGRESS] == 0
    events = flows(ring)
    assert [(e.drop_reason, e.direction, str(e.src)) for e in events] == [
        (DropReason.SOURCE_WRONG_INTERFACE, Direction.INGRESS, src)
    ] * 2


def test_arp_from_a_workload_must_claim_its_own_address(datapath: Datapath, node: PinnedMaps) -> None:
    assert from_a(datapath, pk.arp_frame(A4, R4)) == PASS
    assert from_a(datapath, pk.arp_frame("0.0.0.0", A4)) == PASS  # noqa: S104 - a probe
    assert from_a(datapath, pk.arp_frame(B4, R4, op=2)) == DROP  # B's address
    assert from_a(datapath, pk.arp_frame("10.1.0.200", R4)) == DROP  # nobody's
    assert to_a(datapath, pk.arp_frame(B4, A4, op=2), entered=UPLINK) == DROP  # B's, via the uplink
    assert to_a(datapath, pk.arp_frame(B4, A4), entered=OTHER) == PASS
    counters = node.counters.read()
    assert counters["denied_source_not_owned"] == 2
    assert counters["denied_source_wrong_interface"] == 1


def test_neighbour_discovery_from_a_workload_cannot_claim_another_endpoint(
    datapath: Datapath, node: PinnedMaps
) -> None:
    assert from_a(datapath, pk.neighbor(136, A6, "fe80::1", A6)) == PASS
    assert from_a(datapath, pk.neighbor(135, "fe80::a", "ff02::1:ff00:2", B6)) == PASS  # resolving B
    assert from_a(datapath, pk.neighbor(136, "fe80::a", "fe80::1", B6)) == DROP  # advertising B's
    assert from_a(datapath, pk.neighbor(136, B6, "fe80::1", A6)) == DROP  # from B's address
    assert from_a(datapath, pk.neighbor(135, "::", "ff02::1:ff00:2", B6)) == DROP  # DAD for B's
    assert node.counters.read()["denied_source_not_owned"] == 3


# ------------------------------------------------------------------------------------ flow table


def test_replies_pass_under_an_inbound_wildcard(datapath: Datapath, node: PinnedMaps) -> None:
    node.policy.update_many({PolicyKey(A, IDENTITY_ANY, Direction.INGRESS): AuthType.SPIRE})
    syn = pk.tcp_frame(A4, R4, 40000, 443, pk.SYN)
    synack = pk.tcp_frame(R4, A4, 443, 40000, pk.SYN | pk.ACK)
    assert to_a(datapath, synack) == DROP  # no flow yet: an inbound packet needs authentication
    assert from_a(datapath, syn) == PASS  # A's own connection
    assert to_a(datapath, synack) == PASS  # its reply
    assert to_a(datapath, pk.tcp_frame(R4, A4, 443, 40001, pk.SYN | pk.ACK)) == DROP  # another port
    assert to_a(datapath, pk.tcp_frame(R4, A4, 443, 40000, pk.SYN)) == DROP  # a new connection in
    assert node.counters.read()["established"] >= 1


def udp_frame(src: str, dst: str, sport: int, dport: int) -> bytes:
    if "." in src:
        return pk.ethernet(pk.ipv4(src, dst, pk.UDP, pk.udp(sport, dport)), pk.ETH_P_IP)
    return pk.ethernet(pk.ipv6(src, dst, pk.UDP, pk.udp(sport, dport)), pk.ETH_P_IPV6)


@pytest.mark.parametrize(("local", "remote"), [(A4, R4), (A6, R6)], ids=["ipv4", "ipv6"])
def test_a_refused_inbound_datagram_does_not_refuse_the_workloads_own_request(
    datapath: Datapath, node: PinnedMaps, local: str, remote: str
) -> None:
    # Under `* -> A`, a datagram to A's port that arrives before A's own request is refused, and tabled
    # (to report it once). It opened no flow: A's request on the same ports is judged as A's own and
    # passes on its first packet; the flow it opens lets the replies in.
    node.policy.update_many({PolicyKey(A, IDENTITY_ANY, Direction.INGRESS): AuthType.SPIRE})
    early = udp_frame(remote, local, 53, 40000)
    assert to_a(datapath, early) == DROP
    assert to_a(datapath, early) == DROP  # still nothing to reply to
    assert from_a(datapath, udp_frame(local, remote, 40000, 53)) == PASS
    assert to_a(datapath, early) == PASS  # now a reply
    assert to_a(datapath, udp_frame(remote, local, 53, 40001)) == DROP  # a port A never used
    counters = node.counters.read()
    assert (counters["denied_auth_required"], counters["established"]) == (3, 1)


@pytest.mark.parametrize(("local", "remote"), [(A4, R4), (A6, R6)], ids=["ipv4", "ipv6"])
def test_a_refused_outbound_datagram_does_not_refuse_what_policy_lets_in(
    datapath: Datapath, node: PinnedMaps, local: str, remote: str
) -> None:
    # The other way round, under `A -> *`: A's refused datagram opens nothing, so R's datagram to the
    # same ports, which needs nothing, passes, and A's answer to it is a reply.
    node.policy.update_many({PolicyKey(A, IDENTITY_ANY, Direction.EGRESS): AuthType.SPIRE})
    request = udp_frame(local, remote, 40000, 53)
    assert from_a(datapath, request) == DROP
    assert to_a(datapath, udp_frame(remote, local, 53, 40000)) == PASS
    assert from_a(datapath, request) == PASS  # a reply to R
    assert from_a(datapath, udp_frame(local, remote, 40001, 53)) == DROP


def test_a_forged_packet_cannot_refuse_a_workloads_request_in_advance(
    datapath: Datapath, node: PinnedMaps
) -> None:
    # A packet claiming B's address that entered through the uplink is refused (wrong interface) and
    # tabled under A's flow key. It must not decide how A's own request to B is judged.
    node.policy.update_many({PolicyKey(A, IDENTITY_ANY, Direction.INGRESS): AuthType.SPIRE})
    assert to_a(datapath, udp_frame(B4, A4, 53, 40000), entered=UPLINK) == DROP
    assert from_a(datapath, udp_frame(A4, B4, 40000, 53)) == PASS
    assert to_a(datapath, udp_frame(B4, A4, 53, 40000), entered=OTHER) == PASS  # B's real reply
    assert node.counters.read()["denied_source_wrong_interface"] == 1


def fragment(src: str, dst: str, offset: int, payload: bytes, *, more: bool, ident: int) -> bytes:
    """One fragment of a UDP datagram over IPv4 or IPv6 (offset 0: the first, with the UDP header; and
    no more: the whole datagram)."""
    if "." in src:
        packet = pk.ipv4(src, dst, pk.UDP, payload, frag_offset=offset, more_fragments=more, ident=ident)
        return pk.ethernet(packet, pk.ETH_P_IP)
    if offset == 0 and not more:
        return pk.ethernet(pk.ipv6(src, dst, pk.UDP, payload), pk.ETH_P_IPV6)
    header = pk.ipv6_fragment(pk.UDP, offset, more=more, ident=ident)
    return pk.ethernet(pk.ipv6(src, dst, 44, header + payload), pk.ETH_P_IPV6)


@pytest.mark.parametrize(("local", "remote"), [(A4, R4), (A6, R6)], ids=["ipv4", "ipv6"])
def test_fragmented_replies_follow_their_first_fragment(
    datapath: Datapath, node: PinnedMaps, local: str, remote: str
) -> None:
    # Under an inbound wildcard, a fragmented reply to A's own UDP request passes whole: its later
    # fragments (no UDP header) belong to the flow of the first fragment that passed. A later fragment
    # whose first did not pass cannot be tied to a flow and is judged by its addresses: refused here.
    node.policy.update_many({PolicyKey(A, IDENTITY_ANY, Direction.INGRESS): AuthType.SPIRE})
    request = fragment(local, remote, 0, pk.udp(40000, 53), more=False, ident=1)  # a whole datagram
    first = fragment(remote, local, 0, pk.udp(53, 40000, b"x" * 1472), more=True, ident=9)
    second = fragment(remote, local, 1480, b"y" * 1000, more=False, ident=9)
    assert to_a(datapath, second) == DROP  # before its first fragment: no flow to follow
    assert from_a(datapath, request) == PASS
    assert to_a(datapath, first) == PASS
    assert to_a(datapath, second) == PASS
    assert to_a(datapath, fragment(remote, local, 1480, b"z" * 8, more=False, ident=10)) == DROP  # another
    # A datagram to a port A never used: its first fragment is refused, and so is the rest.
    stray_first = fragment(remote, local, 0, pk.udp(53, 40001, b"x" * 1472), more=True, ident=11)
    stray_second = fragment(remote, local, 1480, b"y" * 8, more=False, ident=11)
    assert to_a(datapath, stray_first) == DROP
    assert to_a(datapath, stray_second) == DROP
    counters = node.counters.read()
    assert counters["established"] == 2
    assert counters["denied_auth_required"] == 4


@pytest.mark.parametrize(("local", "remote", "router"), [(A4, R4, "198.51.100.1"), (A6, R6, "2001:db8:f::1")])
def test_icmp_errors_are_judged_by_the_flow_they_quote(
    datapath: Datapath, node: PinnedMaps, local: str, remote: str, router: str
) -> None:
    node.policy.update_many({PolicyKey(A, IDENTITY_ANY, Direction.INGRESS): AuthType.SPIRE})
    out = pk.tcp_frame(local, remote, 40000, 443, pk.ACK)
    quoted = out[14:]
    other = pk.tcp_frame(local, remote, 40002, 443, pk.ACK)[14:]
    assert to_a(datapath, pk.icmp_error(router, local, quoted)) == DROP  # no such flow
    assert from_a(datapath, out) == PASS
    assert to_a(datapath, pk.icmp_error(router, local, quoted)) == PASS  # frag needed / too big
    assert to_a(datapath, pk.icmp_error(router, local, other)) == DROP  # a flow that does not exist
    forged = pk.tcp_frame(B4 if "." in local else B6, remote, 40000, 443)[14:]
    assert to_a(datapath, pk.icmp_error(router, local, forged)) == DROP  # quotes another endpoint


def test_a_removed_auth_entry_stops_an_established_flow_within_a_second(
    datapath: Datapath, node: PinnedMaps, ring: RingBuffer
) -> None:
    datapath.configure(RuntimeConfig(FlowLevel.FIRST, 10**9))
    node.policy.update_many({PolicyKey(A, R, Direction.EGRESS): AuthType.SPIRE})
    key = AuthKey(A, R, NODE_R)
    node.auth.update_many({key: datetime.now(UTC) + timedelta(minutes=5)})
    syn, ack = pk.tcp_frame(A4, R4, 40000, 443, pk.SYN), pk.tcp_frame(A4, R4, 40000, 443, pk.ACK)
    reply = pk.tcp_frame(R4, A4, 443, 40000, pk.ACK)
    assert from_a(datapath, syn) == PASS
    assert from_a(datapath, ack) == PASS
    assert to_a(datapath, reply) == PASS
    flows(ring)
    node.auth.delete_many([key])
    removed = time.monotonic()
    while from_a(datapath, ack) == PASS:
        assert time.monotonic() - removed < 1.0
        time.sleep(0.005)
    assert time.monotonic() - removed <= FLOW_RECHECK_NS / 1e9 + 0.05
    # The replies stop with it, though R -> A alone needs no authentication: they belong to the flow,
    # and cannot reopen it.
    assert to_a(datapath, reply) == DROP
    assert from_a(datapath, ack) == DROP
    (cut,) = flows(ring)  # the verdict changed
    assert (cut.verdict, cut.drop_reason, cut.reply) == (Verdict.DENIED, DropReason.AUTH_REQUIRED, False)


def test_an_auth_entry_expiring_stops_the_flow_at_its_expiry(datapath: Datapath, node: PinnedMaps) -> None:
    node.policy.update_many({PolicyKey(A, R, Direction.EGRESS): AuthType.SPIRE})
    node.auth.update_tai_ns(AuthKey(A, R, NODE_R), clock.now_tai_ns() + 200_000_000)
    ack = pk.tcp_frame(A4, R4, 40000, 443, pk.ACK)
    assert from_a(datapath, ack) == PASS
    started = time.monotonic()
    while from_a(datapath, ack) == PASS:
        assert time.monotonic() - started < 0.5
        time.sleep(0.005)
    assert node.counters.read()["denied_auth_expired"] >= 1


@pytest.mark.usefixtures("node")
def test_reply_flag_marks_packets_judged_by_their_flow(datapath: Datapath, ring: RingBuffer) -> None:
    datapath.configure(RuntimeConfig(FlowLevel.ALL, 10**9))
    assert from_a(datapath, pk.tcp_frame(A4, R4, 40000, 443, pk.SYN)) == PASS
    assert to_a(datapath, pk.tcp_frame(R4, A4, 443, 40000, pk.ACK)) == PASS
    first, reply = flows(ring)
    assert (first.direction, reply.direction) == (Direction.EGRESS, Direction.INGRESS)
    assert not first.reply
    assert reply.reply
