"""Real traffic between workloads in network namespaces, through a node whose veths carry the programs."""

from __future__ import annotations

import fcntl
import functools
import os
import socket
import struct
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from ipaddress import ip_network

import pytest

from authd.datapath import clock
from authd.datapath.events import AuthRequiredEvent, FlowEvent, decode
from authd.datapath.layout import AuthType, Direction, PolicyMatch, Verdict
from authd.datapath.links import list_links
from authd.datapath.loader import Datapath, attached_prog_ids, is_l3_link
from authd.datapath.maps import AuthKey, IpcacheEntry, PinnedMaps, PolicyKey
from authd.datapath.ownership import read_route_table
from authd.datapath.ringbuf import RingBuffer
from tests.fakes import packets as pk
from tests.privileged.topology import A4, A6, B4, B6, Topology, sh

pytestmark = pytest.mark.privileged

A, B = 300, 400
PORT = 8080


class EchoServer:
    """Echoes one message per connection, listening in workload B on IPv4 and IPv6."""

    def __init__(self, topo: Topology) -> None:
        self.sockets = [
            topo.run(topo.b, functools.partial(self._listen, family))
            for family in (socket.AF_INET, socket.AF_INET6)
        ]
        self.threads = [threading.Thread(target=self._serve, args=(s,), daemon=True) for s in self.sockets]
        for thread in self.threads:
            thread.start()

    @staticmethod
    def _listen(family: socket.AddressFamily) -> socket.socket:
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", PORT))  # noqa: S104 - inside a test netns
        sock.listen(16)
        return sock

    @staticmethod
    def _serve(sock: socket.socket) -> None:
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(2)
                try:
                    conn.sendall(conn.recv(64))
                except OSError:
                    continue

    def close(self) -> None:
        for sock in self.sockets:
            sock.shutdown(socket.SHUT_RDWR)
            sock.close()


def connects(topo: Topology, address: str, timeout: float = 0.6) -> bool:
    """Whether a TCP connection from workload A to B completes and echoes within ``timeout``."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = topo.run(topo.a, lambda: socket.socket(family, socket.SOCK_STREAM))
    sock.settimeout(timeout)
    try:
        sock.connect((address, PORT))
        sock.sendall(b"hello")
        return sock.recv(64) == b"hello"
    except OSError:
        return False
    finally:
        sock.close()


@pytest.fixture
def node(topology: Topology, datapath: Datapath, maps: PinnedMaps) -> Iterator[Topology]:
    """The programs on both host-side veths; A and B are local workloads of this node."""

    def attach() -> None:
        for link in (topology.link_a, topology.link_b):
            datapath.attach(socket.if_nametoindex(link), l3=False)

    topology.run(topology.node, attach)
    topology.learn_ownership(maps.endpoints)
    maps.ipcache.update_many(
        {
            ip_network(f"{A4}/32"): IpcacheEntry(A, 0),
            ip_network(f"{A6}/128"): IpcacheEntry(A, 0),
            ip_network(f"{B4}/32"): IpcacheEntry(B, 0),
            ip_network(f"{B6}/128"): IpcacheEntry(B, 0),
        }
    )
    server = EchoServer(topology)
    try:
        yield topology
    finally:
        server.close()


def decoded(ring: RingBuffer) -> list[AuthRequiredEvent | FlowEvent]:
    return [decode(r, clock.tai_offset_ns()) for r in ring.read()]


@pytest.mark.parametrize("address", [B4, B6], ids=["ipv4", "ipv6"])
def test_tcp_needs_auth_until_entry_written_and_again_after_expiry_or_delete(
    node: Topology, maps: PinnedMaps, auth_ring: RingBuffer, address: str
) -> None:
    assert connects(node, address)  # no policy yet: passes
    maps.policy.update_many({PolicyKey(B, A, Direction.INGRESS): AuthType.SPIRE})
    auth_ring.drain()
    assert not connects(node, address)
    auth = [e for e in decoded(auth_ring) if isinstance(e, AuthRequiredEvent)]
    assert len(auth) == 1  # a SYN and maybe a retransmission, one event per key per interval
    assert auth[0].key == AuthKey(B, A, 0, AuthType.SPIRE)
    assert auth[0].direction is Direction.INGRESS
    assert str(auth[0].dst) == address
    key = AuthKey(B, A, 0)
    maps.auth.update_many({key: datetime.now(UTC) + timedelta(minutes=1)})
    assert connects(node, address)
    maps.auth.update_many({key: datetime.now(UTC) + timedelta(seconds=0.8)})
    assert connects(node, address)
    time.sleep(0.9)
    assert not connects(node, address)
    assert maps.counters.read()["denied_auth_expired"] >= 1
    maps.auth.update_many({key: datetime.now(UTC) + timedelta(minutes=1)})
    assert connects(node, address)
    maps.auth.delete_many([key])
    assert not connects(node, address)


def test_flow_events_from_real_connections(node: Topology, maps: PinnedMaps, ring: RingBuffer) -> None:
    maps.policy.update_many({PolicyKey(B, A, Direction.INGRESS): AuthType.SPIRE})
    maps.auth.update_many({AuthKey(B, A, 0): datetime.now(UTC) + timedelta(minutes=1)})
    ring.drain()
    assert connects(node, B4)
    flows = [e for e in decoded(ring) if isinstance(e, FlowEvent)]
    syns = [f for f in flows if f.tcp_flags == pk.SYN]
    by_direction = {f.direction: f for f in syns}
    leaving, arriving = by_direction[Direction.EGRESS], by_direction[Direction.INGRESS]
    assert (leaving.local_identity, leaving.match, leaving.verdict) == (A, PolicyMatch.NONE, Verdict.ALLOWED)
    assert (arriving.local_identity, arriving.remote_identity) == (B, A)
    assert (arriving.match, arriving.verdict, arriving.auth_type) == (
        PolicyMatch.AUTH,
        Verdict.ALLOWED,
        AuthType.SPIRE,
    )
    assert (str(arriving.src), str(arriving.dst), arriving.dst_port) == (A4, B4, PORT)
    assert arriving.ifindex == node.ifindex(node.link_b)


def test_pairs_without_policy_and_arp_pass(node: Topology, maps: PinnedMaps) -> None:
    maps.policy.update_many({PolicyKey(B, 999, Direction.INGRESS): AuthType.SPIRE})  # another pair
    for ns in (node.a, node.b, node.node):
        sh("ip", "-n", ns, "neigh", "flush", "all")
    assert connects(node, B4)
    assert connects(node, B6)
    counters = maps.counters.read()
    assert counters["neighbor"] >= 2  # ARP requests and replies crossed the programs
    assert counters["allowed"] >= 4
    assert counters["denied_auth_required"] == 0


def test_truncated_ip_on_the_wire_is_dropped(node: Topology, maps: PinnedMaps) -> None:
    frames = [
        b"\xff" * 6 + pk.SRC_MAC + struct.pack("!H", pk.ETH_P_IP) + pk.ipv4(A4, B4, pk.TCP, b"")[:16],
        b"\xff" * 6 + pk.SRC_MAC + struct.pack("!H", pk.ETH_P_IPV6) + pk.ipv6(A6, B6, pk.TCP, b"")[:24],
    ]

    def send() -> None:
        with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as raw:
            raw.bind(("eth0", 0))
            for frame in frames:
                raw.send(frame)

    node.run(node.a, send)
    assert counter_reaches(maps, "denied_malformed", 2)
    assert connects(node, B4)  # and the program keeps working


def test_detach_removes_only_authd_programs(node: Topology, datapath: Datapath) -> None:
    index = node.ifindex(node.link_a)
    ingress, egress = node.run(node.node, lambda: attached_prog_ids(index))
    assert ingress is not None
    assert egress is not None
    assert node.run(node.node, lambda: datapath.detach(index))
    assert node.run(node.node, lambda: attached_prog_ids(index)) == (None, None)
    assert not node.run(node.node, lambda: datapath.detach(index))


def counter_reaches(maps: PinnedMaps, name: str, value: int) -> bool:
    deadline = time.monotonic() + 2
    while maps.counters.read()[name] < value and time.monotonic() < deadline:
        time.sleep(0.01)
    return maps.counters.read()[name] == value


def open_tun(name: str) -> int:
    """A TUN device (no link-layer header, ARPHRD_NONE) in the calling thread's namespace; returns its fd."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    ifreq = struct.pack("16sH", name.encode(), 0x0001 | 0x1000)  # IFF_TUN | IFF_NO_PI
    fcntl.ioctl(fd, 0x400454CA, ifreq)  # TUNSETIFF
    return fd


def test_l3_devices_get_the_l3_programs(topology: Topology, datapath: Datapath, maps: PinnedMaps) -> None:
    tun = f"adp{topology.tag}t"
    fd = topology.run(topology.node, lambda: open_tun(tun))
    try:
        sh("ip", "-n", topology.node, "addr", "add", "10.203.0.1/24", "dev", tun)
        sh("ip", "-n", topology.node, "link", "set", tun, "up")
        link = next(lk for lk in topology.run(topology.node, list_links) if lk.name == tun)
        assert is_l3_link(link.link_type)
        topology.run(topology.node, lambda: datapath.attach(link.index, l3=True))
        maps.ipcache.update_many(
            {ip_network("10.203.0.1/32"): IpcacheEntry(B, 0), ip_network("10.203.0.2/32"): IpcacheEntry(A, 5)}
        )
        maps.policy.update_many({PolicyKey(B, A, Direction.INGRESS): AuthType.SPIRE})
        syn = pk.ipv4("10.203.0.2", "10.203.0.1", pk.TCP, pk.tcp(40000, 22))
        os.write(fd, syn)  # arrives on the tun device: its ingress hook
        assert counter_reaches(maps, "denied_auth_required", 1)
        maps.auth.update_many({AuthKey(B, A, 5): datetime.now(UTC) + timedelta(minutes=1)})
        os.write(fd, syn)
        assert counter_reaches(maps, "allowed_auth", 1)
        assert maps.counters.read()["denied_malformed"] == 0  # parsed from offset 0, not as Ethernet
    finally:
        os.close(fd)


def test_a_route_to_the_nodes_own_address_is_no_endpoint(topology: Topology) -> None:
    # ptp puts the pod's IPv6 gateway on the pod's veth as a /128, which leaves a host route through the
    # veth just like the pod's own: that address is the node's, and no pod interface owns it.
    sh("ip", "-n", topology.node, "addr", "add", "fd00:201:9::1/128", "dev", topology.link_a, "nodad")
    sh("ip", "-n", topology.node, "addr", "add", "10.201.9.1/32", "dev", topology.link_a)
    sh("ip", "-n", topology.node, "route", "add", "10.201.9.1/32", "dev", topology.link_a, "table", "main")
    table = topology.run(topology.node, read_route_table)
    routed = {str(r.network) for r in table.routes}
    assert {f"{A4}/32", f"{A6}/128"} <= routed
    assert not routed & {"fd00:201:9::1/128", "10.201.9.1/32"}
