"""The tc programs run on crafted frames with BPF_PROG_TEST_RUN: verdicts, direction, wildcards, events,
and malformed packets that must neither crash nor bypass the policy."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from ipaddress import ip_network

import pytest

from authd.datapath import clock, syscalls
from authd.datapath.events import AuthRequiredEvent, FlowEvent, decode
from authd.datapath.layout import (
    ENDPOINT_F_ROUTE,
    IDENTITY_ANY,
    AuthType,
    Direction,
    DropReason,
    FlowLevel,
    Hook,
    PolicyMatch,
    ProgramName,
    Verdict,
)
from authd.datapath.loader import Datapath
from authd.datapath.maps import AuthKey, EndpointOwner, IpcacheEntry, PinnedMaps, PolicyKey, RuntimeConfig
from authd.datapath.ringbuf import RingBuffer
from tests.fakes import packets as pk

pytestmark = pytest.mark.privileged

PASS, DROP = -1, 2  # TC_ACT_UNSPEC (authd never ends the filter chain on a pass), TC_ACT_SHOT
A4, B4, C4 = "10.1.0.1", "10.2.0.1", "192.0.2.9"
A6, B6 = "fd00:1::1", "fd00:2::1"
A, B = 300, 400  # identity handles
NODE_B = 7


LO = 1  # the test run's skb is on the loopback device: the workload interface here


def run(
    datapath: Datapath,
    frame: bytes,
    program: ProgramName = ProgramName.INGRESS,
    repeat: int = 1,
    ingress_ifindex: int = 0,
) -> int:
    fd = datapath.prog_fd(program)
    return syscalls.prog_test_run(fd, frame, repeat=repeat, ingress_ifindex=ingress_ifindex).retval


def own(maps: PinnedMaps, *addresses: str, ifindex: int = LO) -> None:
    """Record the addresses as owned by ``ifindex`` in the endpoints map."""
    maps.endpoints.update_many({ip_network(a): EndpointOwner(ifindex, ENDPOINT_F_ROUTE) for a in addresses})


def events(ring: RingBuffer) -> list[AuthRequiredEvent | FlowEvent]:
    return [decode(record, clock.tai_offset_ns()) for record in ring.read()]


@pytest.fixture
def cluster(maps: PinnedMaps) -> PinnedMaps:
    """A is local, behind the test run's interface; B lives on node 7 (v4 and v6). A's egress to B needs
    SPIRE authentication."""
    own(maps, A4, A6)
    maps.ipcache.update_many(
        {
            ip_network(f"{A4}/32"): IpcacheEntry(A, 0),
            ip_network(f"{A6}/128"): IpcacheEntry(A, 0),
            ip_network("10.2.0.0/16"): IpcacheEntry(B, NODE_B),
            ip_network("fd00:2::/64"): IpcacheEntry(B, NODE_B),
        }
    )
    maps.policy.update_many({PolicyKey(A, B, Direction.EGRESS): AuthType.SPIRE})
    return maps


def future() -> datetime:
    return datetime.now(UTC) + timedelta(minutes=5)


def test_verifier_accepts_every_program(datapath: Datapath) -> None:
    for name in ProgramName:
        info = syscalls.prog_info(datapath.prog_fd(name))
        assert info.name == name
        assert info.type == syscalls.BPF_PROG_TYPE_SCHED_CLS
        assert len(info.map_ids) >= 6


def test_arp_passes_and_unowned_addresses_do_not(datapath: Datapath, cluster: PinnedMaps) -> None:
    assert run(datapath, pk.arp_frame()) == PASS  # a probe (sender 0.0.0.0)
    assert run(datapath, pk.arp_frame(A4, B4)) == PASS
    assert run(datapath, pk.arp_frame(B4, A4), ProgramName.EGRESS) == PASS
    # Neither end is the workload's: from it, or to it, such a packet is refused, never "not local".
    assert run(datapath, pk.tcp_frame(C4, "198.51.100.1")) == DROP
    assert run(datapath, pk.tcp_frame(C4, "198.51.100.1"), ProgramName.EGRESS) == DROP
    counters = cluster.counters.read()
    assert counters["neighbor"] == 3
    assert counters["denied_source_not_owned"] == 1
    assert counters["denied_destination_not_owned"] == 1


@pytest.mark.parametrize("icmp_type", [133, 135, 136])
def test_ipv6_neighbour_discovery_passes_like_arp(
    datapath: Datapath, cluster: PinnedMaps, icmp_type: int
) -> None:
    # Found in the end-to-end tests: with a wildcard ingress policy, the node's neighbour solicitations
    # for a workload's IPv6 address were dropped (from "world"), so nothing could reach it over IPv6.
    cluster.policy.update_many(
        {
            PolicyKey(A, IDENTITY_ANY, Direction.INGRESS): AuthType.SPIRE,
            PolicyKey(A, IDENTITY_ANY, Direction.EGRESS): AuthType.SPIRE,
        }
    )
    to_a = pk.ethernet(pk.ipv6("fe80::1", A6, pk.ICMPV6, pk.icmpv6(icmp_type), hop_limit=255), pk.ETH_P_IPV6)
    from_a = pk.ethernet(
        pk.ipv6(A6, "fe80::1", pk.ICMPV6, pk.icmpv6(icmp_type), hop_limit=255), pk.ETH_P_IPV6
    )

    assert run(datapath, to_a) == PASS
    assert run(datapath, from_a) == PASS
    assert run(datapath, to_a, ProgramName.EGRESS) == PASS
    counters = cluster.counters.read()
    assert counters["neighbor"] == 3
    assert counters["denied_auth_required"] == 0


def test_router_messages_from_a_workload_are_dropped(
    datapath: Datapath, ring: RingBuffer, cluster: PinnedMaps
) -> None:
    # A pod must not act as a router: its router advertisements and redirects (IPv6 and IPv4) are
    # dropped however they are addressed, even where an ICMP flow to the same peer is allowed. The node's
    # own advertisements to the pod pass as neighbour discovery.
    cluster.auth.update_many({AuthKey(A, B, NODE_B): future()})
    assert run(datapath, pk.ethernet(pk.ipv4(A4, B4, pk.ICMP, b"\x08\x00\x00\x00"), pk.ETH_P_IP)) == PASS
    assert run(datapath, pk.ethernet(pk.ipv6(A6, B6, pk.ICMPV6, pk.icmpv6(128)), pk.ETH_P_IPV6)) == PASS
    from_a = [
        pk.ethernet(pk.ipv6("fe80::2", "ff02::1", pk.ICMPV6, pk.icmpv6(134), hop_limit=255), pk.ETH_P_IPV6),
        pk.ethernet(pk.ipv6("fe80::2", "fe80::1", pk.ICMPV6, pk.icmpv6(137), hop_limit=255), pk.ETH_P_IPV6),
        pk.ethernet(pk.ipv6(A6, B6, pk.ICMPV6, pk.icmpv6(137)), pk.ETH_P_IPV6),  # routed, flow allowed
        pk.ethernet(pk.ipv4(A4, B4, pk.ICMP, b"\x05\x01\x00\x00" + bytes(4)), pk.ETH_P_IP),
    ]
    ring.drain()
    assert [run(datapath, frame) for frame in from_a] == [DROP] * len(from_a)
    assert [f.drop_reason for f in flows(ring)] == [DropReason.ROUTER_MESSAGE] * len(from_a)
    to_a = pk.ethernet(pk.ipv6("fe80::1", A6, pk.ICMPV6, pk.icmpv6(134), hop_limit=255), pk.ETH_P_IPV6)
    assert run(datapath, to_a, ProgramName.EGRESS) == PASS
    counters = cluster.counters.read()
    assert counters["denied_router_message"] == len(from_a)
    assert counters["neighbor"] == 1


@pytest.mark.parametrize(
    "frame",
    [
        pk.ethernet(pk.ipv6("fe80::1", A6, pk.ICMPV6, pk.icmpv6(128), hop_limit=255), pk.ETH_P_IPV6),  # echo
        pk.ethernet(pk.ipv6("fe80::1", A6, pk.ICMPV6, pk.icmpv6(pk.NEIGHBOR_SOLICITATION)), pk.ETH_P_IPV6),
        pk.ethernet(
            pk.ipv6(
                "fe80::1",
                A6,
                44,  # a first fragment: RFC 6980 forbids fragmented neighbour discovery
                pk.ipv6_fragment(pk.ICMPV6, 0, more=True) + pk.icmpv6(pk.NEIGHBOR_SOLICITATION),
                hop_limit=255,
            ),
            pk.ETH_P_IPV6,
        ),
        pk.ethernet(pk.ipv6("fe80::1", A6, pk.UDP, pk.udp(135, 135), hop_limit=255), pk.ETH_P_IPV6),
    ],
    ids=["echo-request", "routed-solicitation", "fragment", "udp"],
)
def test_only_neighbour_discovery_itself_is_exempt(
    datapath: Datapath, cluster: PinnedMaps, frame: bytes
) -> None:
    cluster.policy.update_many({PolicyKey(A, IDENTITY_ANY, Direction.INGRESS): AuthType.SPIRE})
    assert run(datapath, frame, ProgramName.EGRESS) == DROP
    assert cluster.counters.read()["denied_auth_required"] == 1


@pytest.mark.parametrize(("src", "dst"), [(A4, B4), (A6, B6)], ids=["ipv4", "ipv6"])
def test_auth_entry_decides_and_expires(datapath: Datapath, cluster: PinnedMaps, src: str, dst: str) -> None:
    frame = pk.tcp_frame(src, dst)
    key = AuthKey(A, B, NODE_B)
    assert run(datapath, frame) == DROP
    cluster.auth.update_many({key: future()})
    assert run(datapath, frame) == PASS
    cluster.auth.update_many({key: datetime.now(UTC) - timedelta(seconds=1)})
    assert run(datapath, frame) == DROP
    cluster.auth.update_many({key: future()})
    assert run(datapath, frame) == PASS
    assert cluster.auth.delete_many([key]) == 1
    assert run(datapath, frame) == DROP
    counters = cluster.counters.read()
    assert counters["denied_auth_required"] == 2
    assert counters["denied_auth_expired"] == 1
    assert counters["allowed_auth"] == 2


def test_expiry_is_compared_with_clock_tai(datapath: Datapath, cluster: PinnedMaps) -> None:
    frame = pk.tcp_frame(A4, B4)
    key = AuthKey(A, B, NODE_B)
    cluster.auth.update_tai_ns(key, clock.now_tai_ns() + 300_000_000)
    assert run(datapath, frame) == PASS
    time.sleep(0.35)
    assert run(datapath, frame) == DROP


def test_auth_entry_is_per_remote_node_and_auth_type(datapath: Datapath, cluster: PinnedMaps) -> None:
    frame = pk.tcp_frame(A4, B4)
    cluster.auth.update_many(
        {AuthKey(A, B, NODE_B + 1): future(), AuthKey(A, B, NODE_B, AuthType.NONE): future()}
    )
    assert run(datapath, frame) == DROP


def test_packets_to_the_workload_are_judged_as_ingress(datapath: Datapath, cluster: PinnedMaps) -> None:
    # At the egress hook of A's interface the local end (A) is the destination: INGRESS into A.
    assert run(datapath, pk.tcp_frame(B4, A4, 80, 40000), ProgramName.EGRESS) == PASS
    cluster.policy.update_many({PolicyKey(A, B, Direction.INGRESS): AuthType.SPIRE})
    assert run(datapath, pk.tcp_frame(B4, A4, 80, 40001), ProgramName.EGRESS) == DROP


def test_the_interface_decides_which_end_is_local(datapath: Datapath, maps: PinnedMaps) -> None:
    maps.ipcache.update_many(
        {ip_network(f"{A4}/32"): IpcacheEntry(A, 0), ip_network(f"{B4}/32"): IpcacheEntry(B, 0)}
    )
    maps.policy.update_many({PolicyKey(B, A, Direction.INGRESS): AuthType.SPIRE})
    own(maps, A4, B4)
    frame = pk.tcp_frame(A4, B4)
    # Ingress hook (A's host-side veth): leaving A, EGRESS for A: no policy.
    assert run(datapath, frame, ProgramName.INGRESS) == PASS
    # Egress hook (B's host-side veth): arriving at B, INGRESS for B: needs (B, A, local node).
    assert run(datapath, frame, ProgramName.EGRESS, ingress_ifindex=LO) == DROP
    maps.auth.update_many({AuthKey(B, A, 0): future()})
    assert run(datapath, frame, ProgramName.EGRESS, ingress_ifindex=LO) == PASS


@pytest.mark.parametrize(
    "policy",
    [
        PolicyKey(A, IDENTITY_ANY, Direction.EGRESS),
        PolicyKey(IDENTITY_ANY, B, Direction.EGRESS),
        PolicyKey(IDENTITY_ANY, IDENTITY_ANY, Direction.EGRESS),
    ],
    ids=["local-any", "any-remote", "any-any"],
)
def test_wildcard_policy(datapath: Datapath, maps: PinnedMaps, policy: PolicyKey) -> None:
    own(maps, A4)
    maps.ipcache.update_many(
        {ip_network(f"{A4}/32"): IpcacheEntry(A, 0), ip_network(f"{B4}/32"): IpcacheEntry(B, 3)}
    )
    frame = pk.tcp_frame(A4, B4)
    assert run(datapath, frame) == PASS
    maps.policy.update_many({policy: AuthType.SPIRE})
    assert run(datapath, frame) == DROP
    maps.auth.update_many({AuthKey(A, B, 3): future()})
    assert run(datapath, frame) == PASS
    assert len(maps.policy.items()) == 1  # one entry, not one per pair


def test_exact_entry_with_no_auth_exempts_from_wildcard(datapath: Datapath, cluster: PinnedMaps) -> None:
    cluster.policy.update_many(
        {
            PolicyKey(A, IDENTITY_ANY, Direction.EGRESS): AuthType.SPIRE,
            PolicyKey(A, B, Direction.EGRESS): AuthType.NONE,
        }
    )
    assert run(datapath, pk.tcp_frame(A4, B4)) == PASS
    assert run(datapath, pk.tcp_frame(A4, C4)) == DROP  # C is not in the ipcache: world, still covered


def test_unknown_remote_is_world(datapath: Datapath, auth_ring: RingBuffer, cluster: PinnedMaps) -> None:
    cluster.policy.update_many({PolicyKey(A, IDENTITY_ANY, Direction.EGRESS): AuthType.SPIRE})
    assert run(datapath, pk.tcp_frame(A4, C4)) == DROP
    (auth,) = [e for e in events(auth_ring) if isinstance(e, AuthRequiredEvent)]
    assert auth.key == AuthKey(A, 0, 0)


@pytest.mark.parametrize(
    "frame",
    [
        # The kernel's test run refuses untagged IP frames too short for their IP header, so those ride
        # behind an in-band VLAN tag here (the programs parse through it); the netns tests send
        # untagged ones on a real link.
        pk.ethernet(pk.ipv4(A4, B4, pk.TCP, b"")[:12], pk.ETH_P_IP, vlan=5),  # cut before the addresses
        pk.ethernet(b"\x45", pk.ETH_P_IP, vlan=5),
        pk.ethernet(pk.ipv6(A6, B6, pk.TCP, b"")[:30], pk.ETH_P_IPV6, vlan=5),
        pk.ethernet(pk.ipv4(A4, B4, pk.TCP, pk.tcp(1, 2), ihl=4), pk.ETH_P_IP),  # IHL below 5
        pk.ethernet(pk.ipv4(A4, B4, pk.TCP, pk.tcp(1, 2), version=6), pk.ETH_P_IP),  # wrong version
        pk.ethernet(pk.ipv6(A6, B6, pk.TCP, pk.tcp(1, 2), version=4), pk.ETH_P_IPV6),
    ],
    ids=["v4-truncated", "v4-one-byte", "v6-truncated", "v4-ihl4", "v4-version", "v6-version"],
)
def test_malformed_ip_is_dropped(datapath: Datapath, cluster: PinnedMaps, frame: bytes) -> None:
    assert run(datapath, frame) == DROP
    assert run(datapath, frame, ProgramName.EGRESS) == DROP
    assert cluster.counters.read()["denied_malformed"] == 2


def _odd_frames(src: str, dst: str) -> list[bytes]:
    """Packets of the A->B pair that must get the pair's verdict however they are shaped."""
    if ":" in src:
        hop = pk.ipv6_ext(60) + pk.ipv6_ext(6, 1)  # hop-by-hop -> dst options -> TCP
        many = b"".join(pk.ipv6_ext(60) for _ in range(12)) + pk.ipv6_ext(6)
        return [
            pk.ethernet(pk.ipv6(src, dst, 0, hop + pk.tcp(1, 2)), pk.ETH_P_IPV6),
            pk.ethernet(pk.ipv6(src, dst, 44, pk.ipv6_fragment(6, 1448) + b"data"), pk.ETH_P_IPV6),
            pk.ethernet(pk.ipv6(src, dst, 44, pk.ipv6_fragment(6, 0, more=True) + b"\x00"), pk.ETH_P_IPV6),
            pk.ethernet(pk.ipv6(src, dst, 60, many + pk.tcp(1, 2)), pk.ETH_P_IPV6),  # past the walk's bound
            pk.ethernet(pk.ipv6(src, dst, 0, b"\x06"), pk.ETH_P_IPV6),  # extension header cut short
        ]
    return [
        pk.ethernet(pk.ipv4(src, dst, pk.TCP, pk.tcp(1, 2), options=b"\x01" * 4), pk.ETH_P_IP),
        pk.ethernet(pk.ipv4(src, dst, pk.TCP, pk.tcp(1, 2), options=b"\x01" * 40), pk.ETH_P_IP),
        pk.ethernet(pk.ipv4(src, dst, pk.TCP, b"data" * 4, frag_offset=1480), pk.ETH_P_IP),
        pk.ethernet(pk.ipv4(src, dst, pk.TCP, b"\x00\x50", more_fragments=True), pk.ETH_P_IP),  # tiny first
        pk.ethernet(pk.ipv4(src, dst, pk.UDP, pk.udp(53, 53)), pk.ETH_P_IP, vlan=5),
        pk.ethernet(pk.ipv4(src, dst, pk.ICMP, b"\x08\x00\x00\x00"), pk.ETH_P_IP),
        pk.ethernet(pk.ipv4(src, dst, 47, b""), pk.ETH_P_IP),  # GRE, no L4 header at all
    ]


@pytest.mark.parametrize(("src", "dst"), [(A4, B4), (A6, B6)], ids=["ipv4", "ipv6"])
def test_options_fragments_and_odd_headers_get_the_pairs_verdict(
    datapath: Datapath, cluster: PinnedMaps, src: str, dst: str
) -> None:
    frames = _odd_frames(src, dst)
    assert [run(datapath, f) for f in frames] == [DROP] * len(frames)
    cluster.auth.update_many({AuthKey(A, B, NODE_B): future()})
    assert [run(datapath, f) for f in frames] == [PASS] * len(frames)
    assert cluster.counters.read()["denied_malformed"] == 0


def test_headers_past_the_in_place_bound_are_copied_out(
    datapath: Datapath, ring: RingBuffer, cluster: PinnedMaps
) -> None:
    # Headers are read in place up to 512 bytes into the frame and copied out past that: a TCP header
    # behind 608 bytes of destination options still gives the flow its ports and flags.
    options = pk.ipv6_ext(pk.TCP, 75)
    frame = pk.ethernet(pk.ipv6(A6, B6, 60, options + pk.tcp(40000, 443)), pk.ETH_P_IPV6)
    assert run(datapath, frame) == DROP
    (denied,) = flows(ring)
    assert (denied.src_port, denied.dst_port, denied.tcp_flags) == (40000, 443, pk.SYN)
    cluster.auth.update_many({AuthKey(A, B, NODE_B): future()})
    assert run(datapath, frame) == PASS


def test_auth_required_events_are_rate_limited_per_key(
    datapath: Datapath, auth_ring: RingBuffer, ring: RingBuffer, cluster: PinnedMaps
) -> None:
    frame = pk.tcp_frame(A4, B4, 40000, 443)
    assert run(datapath, frame, repeat=200) == DROP
    auth = [e for e in events(auth_ring) if isinstance(e, AuthRequiredEvent)]
    assert len(auth) == 1
    event = auth[0]
    assert event.key == AuthKey(A, B, NODE_B, AuthType.SPIRE)
    assert event.direction is Direction.EGRESS
    assert event.reason is DropReason.AUTH_REQUIRED
    assert (str(event.src), str(event.dst), event.protocol) == (A4, B4, 6)
    assert abs((event.timestamp - datetime.now(UTC)).total_seconds()) < 5
    assert all(isinstance(e, FlowEvent) for e in events(ring))  # the flow ring holds no auth events
    counters = cluster.counters.read()
    assert counters["auth_events"] == 1
    assert counters["auth_events_suppressed"] == 199
    # Another key is limited separately; after the interval the first key reports again.
    cluster.ipcache.update_many({ip_network(f"{A4}/32"): IpcacheEntry(A + 1, 0)})
    cluster.policy.update_many({PolicyKey(A + 1, B, Direction.EGRESS): AuthType.SPIRE})
    assert run(datapath, frame, repeat=10) == DROP
    assert [e.key.local for e in events(auth_ring) if isinstance(e, AuthRequiredEvent)] == [A + 1]
    datapath.configure(RuntimeConfig(FlowLevel.NONE, 50_000_000))
    time.sleep(0.06)
    assert run(datapath, frame, repeat=10) == DROP
    assert len([e for e in events(auth_ring) if isinstance(e, AuthRequiredEvent)]) == 1


def test_expired_entry_reports_expired(
    datapath: Datapath, auth_ring: RingBuffer, cluster: PinnedMaps
) -> None:
    cluster.auth.update_many({AuthKey(A, B, NODE_B): datetime.now(UTC) - timedelta(hours=1)})
    run(datapath, pk.tcp_frame(A6, B6))
    (auth,) = [e for e in events(auth_ring) if isinstance(e, AuthRequiredEvent)]
    assert auth.reason is DropReason.AUTH_EXPIRED
    assert (str(auth.src), str(auth.dst)) == (A6, B6)


def test_a_ktls_pair_is_dropped_whatever_the_auth_map_holds(
    datapath: Datapath, auth_ring: RingBuffer, ring: RingBuffer, cluster: PinnedMaps
) -> None:
    datapath.configure(RuntimeConfig(FlowLevel.DENIED, 1_000_000_000))
    cluster.policy.update_many({PolicyKey(A, B, Direction.EGRESS): AuthType.KTLS})
    cluster.auth.update_many(
        {AuthKey(A, B, NODE_B, auth_type): future() for auth_type in (AuthType.SPIRE, AuthType.KTLS)}
    )
    syn = pk.tcp_frame(A4, B4, 40000, 443, pk.SYN)
    assert run(datapath, syn, repeat=3) == DROP
    assert run(datapath, pk.tcp_frame(A6, B6)) == DROP
    assert events(auth_ring) == []  # no attestation can help: authd is not asked for one
    first = flows(ring)[0]
    assert (first.verdict, first.drop_reason, first.auth_type) == (
        Verdict.DENIED,
        DropReason.ENCRYPTION_UNAVAILABLE,
        AuthType.KTLS,
    )
    counters = cluster.counters.read()
    assert counters["denied_encryption_unavailable"] == 4
    assert counters["allowed_auth"] == 0
    # The same pair under a plain rule passes with its auth entry.
    cluster.policy.update_many({PolicyKey(A, B, Direction.EGRESS): AuthType.SPIRE})
    assert run(datapath, pk.tcp_frame(A4, B4, 40001, 443, pk.SYN)) == PASS


def flows(ring: RingBuffer) -> list[FlowEvent]:
    return [e for e in events(ring) if isinstance(e, FlowEvent)]


def test_flow_events_first_packet_syns_and_verdict_changes(
    datapath: Datapath, ring: RingBuffer, cluster: PinnedMaps
) -> None:
    syn = pk.tcp_frame(A4, B4, 40000, 443, pk.SYN)
    ack = pk.tcp_frame(A4, B4, 40000, 443, pk.ACK)
    run(datapath, syn, repeat=3)
    denied = flows(ring)
    assert len(denied) == 3  # every SYN is news: a retried connect
    first = denied[0]
    assert (first.verdict, first.drop_reason, first.match) == (
        Verdict.DENIED,
        DropReason.AUTH_REQUIRED,
        PolicyMatch.AUTH,
    )
    assert (first.direction, first.hook, first.auth_type) == (Direction.EGRESS, Hook.INGRESS, AuthType.SPIRE)
    assert (first.local_identity, first.remote_identity, first.remote_node) == (A, B, NODE_B)
    assert (first.src_identity, first.dst_identity) == (A, B)
    assert (str(first.src), first.src_port, str(first.dst), first.dst_port) == (A4, 40000, B4, 443)
    assert first.tcp_flags == pk.SYN
    run(datapath, ack, repeat=5)
    assert flows(ring) == []  # same connection, same verdict
    cluster.auth.update_many({AuthKey(A, B, NODE_B): future()})
    run(datapath, ack, repeat=5)
    (allowed,) = flows(ring)  # the verdict changed
    assert (allowed.verdict, allowed.drop_reason) == (Verdict.ALLOWED, DropReason.NONE)
    reply = pk.tcp_frame(B4, A4, 443, 40000, pk.ACK)
    run(datapath, reply, ProgramName.EGRESS, repeat=5)
    assert flows(ring) == []  # replies belong to the connection already reported
    assert cluster.counters.read()["flow_events"] == 4


@pytest.mark.usefixtures("cluster")
def test_flow_levels(datapath: Datapath, ring: RingBuffer) -> None:
    allowed = pk.tcp_frame(A4, C4, 1000, 80, pk.ACK)  # no policy towards world
    denied = pk.tcp_frame(A4, B4, 1000, 80, pk.ACK)
    datapath.configure(RuntimeConfig(FlowLevel.NONE, 10**9))
    run(datapath, allowed)
    run(datapath, denied)
    assert flows(ring) == []
    datapath.configure(RuntimeConfig(FlowLevel.DENIED, 10**9))
    run(datapath, pk.tcp_frame(A4, C4, 1001, 80, pk.ACK))
    run(datapath, pk.tcp_frame(A4, B4, 1001, 80, pk.ACK))
    assert [f.verdict for f in flows(ring)] == [Verdict.DENIED]
    datapath.configure(RuntimeConfig(FlowLevel.ALL, 10**9))
    run(datapath, allowed, repeat=4)
    assert [f.match for f in flows(ring)] == [PolicyMatch.NONE] * 4
