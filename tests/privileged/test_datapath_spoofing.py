"""Attacks on a real node in network namespaces: each works without authd's programs and fails with them.

Workloads A, B and C sit behind host-side veths of node H, routed like a routed CNI leaves them (a host
route per address, from which authd learns who owns what). B accepts only A, authenticated. C is the
attacker; with its veth left without programs it stands for the underlay (another interface of the node
authd does not enforce on).
"""

from __future__ import annotations

import functools
import secrets
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from ipaddress import ip_address, ip_network
from pathlib import Path

import pytest

from authd.datapath.layout import ENDPOINT_F_ROUTE, IDENTITY_ANY, AuthType, Direction
from authd.datapath.loader import Datapath
from authd.datapath.maps import AuthKey, EndpointOwner, IpcacheEntry, PinnedMaps, PolicyKey
from authd.datapath.netns import run_in_netns
from tests.fakes import packets as pk
from tests.privileged.topology import A4, A6, B4, B6, Topology, sh

pytestmark = pytest.mark.privileged

A, B, C = 300, 400, 500
C4, C6 = "10.201.3.2", "fd00:201:3::2"
PORT = 9000


@pytest.fixture
def topo() -> Iterator[Topology]:
    topology = Topology(third=True)
    try:
        yield topology
    finally:
        topology.close()


@pytest.fixture
def cluster(topo: Topology, maps: PinnedMaps) -> PinnedMaps:
    topo.learn_ownership(maps.endpoints)
    maps.ipcache.update_many(
        {
            ip_network(A4): IpcacheEntry(A, 0),
            ip_network(A6): IpcacheEntry(A, 0),
            ip_network(B4): IpcacheEntry(B, 0),
            ip_network(B6): IpcacheEntry(B, 0),
            ip_network(C4): IpcacheEntry(C, 0),
            ip_network(C6): IpcacheEntry(C, 0),
        }
    )
    maps.policy.update_many({PolicyKey(B, IDENTITY_ANY, Direction.INGRESS): AuthType.SPIRE})
    maps.auth.update_many({AuthKey(B, A, 0): datetime.now(UTC) + timedelta(minutes=5)})
    return maps


def attach(topo: Topology, datapath: Datapath, *links: str) -> None:
    topo.run(topo.node, lambda: [datapath.attach(socket.if_nametoindex(link), l3=False) for link in links])


def mac(netns: Path, link: str) -> bytes:
    text = sh("ip", "-n", netns.name, "-br", "link", "show", link).split()[2]
    return bytes.fromhex(text.replace(":", ""))


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\x00"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def udp_frame(topo: Topology, src: str, dst: str, payload: bytes, *, link: str = "") -> bytes:
    """A UDP datagram from C's eth0 to the node, with any source address; checksums filled in."""
    udp = bytearray(pk.udp(PORT, PORT, payload))
    if ip_address(src).version == 6:
        pseudo = ip_address(src).packed + ip_address(dst).packed + struct.pack("!IxxxB", len(udp), pk.UDP)
        struct.pack_into("!H", udp, 6, checksum(pseudo + bytes(udp)) or 0xFFFF)
        packet, ethertype = pk.ipv6(src, dst, pk.UDP, bytes(udp)), pk.ETH_P_IPV6
    else:
        header = bytearray(pk.ipv4(src, dst, pk.UDP, bytes(udp)))
        struct.pack_into("!H", header, 10, checksum(bytes(header[:20])))
        packet, ethertype = bytes(header), pk.ETH_P_IP
    dst_mac = mac(topo.path(topo.node), link or topo.link_c)
    return dst_mac + pk.SRC_MAC + struct.pack("!H", ethertype) + packet


def send_raw(topo: Topology, netns: str, *frames: bytes) -> None:
    def send() -> None:
        with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as raw:
            raw.bind(("eth0", 0))
            for frame in frames:
                raw.send(frame)

    topo.run(netns, send)


class Receiver:
    """Collects UDP payloads arriving at B on PORT (IPv4 and IPv6)."""

    def __init__(self, topo: Topology) -> None:
        self.got: list[bytes] = []
        self.socks = [
            topo.run(topo.b, functools.partial(self._open, family))
            for family in (socket.AF_INET, socket.AF_INET6)
        ]
        self.threads = [threading.Thread(target=self._read, args=(s,), daemon=True) for s in self.socks]
        for thread in self.threads:
            thread.start()

    @staticmethod
    def _open(family: socket.AddressFamily) -> socket.socket:
        sock = socket.socket(family, socket.SOCK_DGRAM)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", PORT))  # noqa: S104 - test netns
        sock.settimeout(0.2)
        return sock

    def _read(self, sock: socket.socket) -> None:
        while True:
            try:
                self.got.append(sock.recv(2048))
            except TimeoutError:
                continue
            except OSError:
                return

    def arrived(self, payload: bytes, wait: float = 0.5) -> bool:
        deadline = time.monotonic() + wait
        while payload not in self.got and time.monotonic() < deadline:
            time.sleep(0.01)
        return payload in self.got

    def close(self) -> None:
        for sock in self.socks:
            sock.close()


@pytest.fixture
def receiver(topo: Topology) -> Iterator[Receiver]:
    rx = Receiver(topo)
    try:
        yield rx
    finally:
        rx.close()


def rp_filter(topo: Topology, value: int) -> None:
    for key in ("all", "default", topo.link_c):
        sh(
            "nsenter",
            f"--net={topo.path(topo.node)}",
            "sysctl",
            "-qw",
            f"net.ipv4.conf.{key}.rp_filter={value}",
        )


def reaches_b(topo: Topology, receiver: Receiver, src: str, tag: str) -> bool:
    payload = f"spoof-{tag}-{time.monotonic_ns()}".encode()
    send_raw(topo, topo.c, udp_frame(topo, src, B6 if ":" in src else B4, payload))
    return receiver.arrived(payload, wait=0.4 if tag.startswith("with") else 1.0)


@pytest.mark.parametrize("rp", [0, 1, 2])
def test_same_node_ipv4_spoofing_fails_whatever_rp_filter(
    topo: Topology, datapath: Datapath, cluster: PinnedMaps, receiver: Receiver, rp: int
) -> None:
    rp_filter(topo, rp)
    # Without programs, the kernel delivers C's packet claiming A's address unless rp_filter is strict.
    assert reaches_b(topo, receiver, A4, "without") == (rp != 1)
    attach(topo, datapath, topo.link_a, topo.link_b, topo.link_c)
    assert not reaches_b(topo, receiver, A4, "with")
    assert cluster.counters.read()["denied_source_not_owned"] >= 1
    assert reaches_b(topo, receiver, A4, "ok") is False  # and still refused after the first


def test_same_node_ipv6_spoofing_fails(
    topo: Topology, datapath: Datapath, cluster: PinnedMaps, receiver: Receiver
) -> None:
    assert reaches_b(topo, receiver, A6, "without")  # IPv6 has no rp_filter
    attach(topo, datapath, topo.link_a, topo.link_b, topo.link_c)
    assert not reaches_b(topo, receiver, A6, "with")
    assert cluster.counters.read()["denied_source_not_owned"] >= 1


@pytest.mark.parametrize("src", [A4, A6], ids=["ipv4", "ipv6"])
def test_underlay_packet_claiming_a_local_endpoint_fails(
    topo: Topology, datapath: Datapath, cluster: PinnedMaps, receiver: Receiver, src: str
) -> None:
    rp_filter(topo, 0)
    attach(topo, datapath, topo.link_a, topo.link_b)  # C's link carries no program: the underlay
    assert not reaches_b(topo, receiver, src, "with")
    assert cluster.counters.read()["denied_source_wrong_interface"] >= 1


def arp_request(sender: str, target: str) -> bytes:
    frame = pk.arp_frame(sender, target)
    return b"\xff" * 6 + frame[6:]


def test_arp_claiming_another_endpoint_fails(topo: Topology, datapath: Datapath, cluster: PinnedMaps) -> None:
    node = topo.path(topo.node)

    def poisoned() -> bool:
        shown = sh("nsenter", f"--net={node}", "ip", "neigh", "show", A4, "dev", topo.link_c)
        return "lladdr" in shown

    send_raw(topo, topo.c, arp_request(A4, "10.201.3.1"))
    time.sleep(0.1)
    assert poisoned()  # without programs, the node learns "A is behind C's link"
    sh("nsenter", f"--net={node}", "ip", "neigh", "flush", "dev", topo.link_c)
    attach(topo, datapath, topo.link_a, topo.link_b, topo.link_c)
    send_raw(topo, topo.c, arp_request(A4, "10.201.3.1"))
    time.sleep(0.1)
    assert not poisoned()
    assert cluster.counters.read()["denied_source_not_owned"] == 1


def test_nd_advertisement_claiming_another_endpoint_fails(
    topo: Topology, datapath: Datapath, cluster: PinnedMaps
) -> None:
    attach(topo, datapath, topo.link_a, topo.link_b, topo.link_c)
    advert = pk.neighbor(136, "fe80::c", "ff02::1", A6)
    send_raw(topo, topo.c, mac(topo.path(topo.node), topo.link_c) + advert[6:])
    deadline = time.monotonic() + 1
    while cluster.counters.read()["denied_source_not_owned"] < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert cluster.counters.read()["denied_source_not_owned"] == 1


@pytest.mark.parametrize("tags", [2, 3])
def test_stacked_priority_tags_are_judged_or_dropped(
    topo: Topology, datapath: Datapath, cluster: PinnedMaps, receiver: Receiver, tags: int
) -> None:
    delivered = tags <= 2  # followed to a depth of two; deeper is malformed

    def tagged(payload: bytes) -> bytes:
        frame = udp_frame(topo, C4, B4, payload)
        return frame[:12] + struct.pack("!HH", pk.ETH_P_8021Q, 0) * tags + frame[12:]

    cluster.auth.update_many({AuthKey(B, C, 0): datetime.now(UTC) + timedelta(minutes=5)})
    send_raw(topo, topo.c, tagged(b"tagged-without"))
    assert receiver.arrived(b"tagged-without", 1.0)  # the kernel strips the tags and delivers
    attach(topo, datapath, topo.link_a, topo.link_b, topo.link_c)
    send_raw(topo, topo.c, tagged(b"tagged-with"))
    assert receiver.arrived(b"tagged-with", 0.5) == delivered
    assert cluster.counters.read()["denied_malformed"] == (0 if delivered else 1)


@pytest.mark.parametrize(("server", "mtu_cmd"), [(B4, "-4"), (B6, "-6")], ids=["ipv4", "ipv6"])
def test_inbound_wildcard_keeps_outbound_tcp_and_path_mtu_discovery(
    topo: Topology, datapath: Datapath, maps: PinnedMaps, server: str, mtu_cmd: str
) -> None:
    topo.learn_ownership(maps.endpoints)
    maps.ipcache.update_many({ip_network(A4): IpcacheEntry(A, 0), ip_network(A6): IpcacheEntry(A, 0)})
    maps.policy.update_many({PolicyKey(A, IDENTITY_ANY, Direction.INGRESS): AuthType.SPIRE})  # `* -> A`
    attach(topo, datapath, topo.link_a, topo.link_b)
    sh("ip", "-n", topo.node, "link", "set", topo.link_b, "mtu", "1280")
    family = socket.AF_INET6 if ":" in server else socket.AF_INET
    listener = topo.run(topo.b, lambda: socket.socket(family, socket.SOCK_STREAM))
    listener.bind((server, PORT))
    listener.listen(1)
    received = bytearray()

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(5)
            while len(received) < 60_000 and (chunk := conn.recv(65536)):
                received.extend(chunk)
            conn.sendall(b"done")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    client = topo.run(topo.a, lambda: socket.socket(family, socket.SOCK_STREAM))
    client.settimeout(5)
    try:
        client.connect((server, PORT))  # A's own connection: its replies come back through `* -> A`
        client.sendall(b"x" * 60_000)  # full-size segments: the node answers "fragmentation needed"
        assert client.recv(16) == b"done"
    finally:
        client.close()
        listener.close()
        thread.join(2)
    assert len(received) == 60_000
    route = sh("ip", "-n", topo.a, mtu_cmd, "route", "get", server)
    assert "mtu 1280" in route  # path MTU learnt from the ICMP error that passed
    counters = maps.counters.read()
    assert counters["established"] > 0
    assert counters["denied_auth_required"] == 0


@pytest.mark.parametrize(("here", "there"), [(A4, B4), (A6, B6)], ids=["ipv4", "ipv6"])
def test_a_datagram_refused_before_the_workloads_request_does_not_refuse_the_request(
    topo: Topology, datapath: Datapath, maps: PinnedMaps, here: str, there: str
) -> None:
    # Under `* -> A`, B's datagram to A's port, sent before A has asked anything, is refused. A's own
    # request from that port then reaches B with its first datagram, and B's answer comes back.
    topo.learn_ownership(maps.endpoints)
    maps.ipcache.update_many({ip_network(A4): IpcacheEntry(A, 0), ip_network(A6): IpcacheEntry(A, 0)})
    maps.policy.update_many({PolicyKey(A, IDENTITY_ANY, Direction.INGRESS): AuthType.SPIRE})
    attach(topo, datapath, topo.link_a, topo.link_b)
    family = socket.AF_INET6 if ":" in here else socket.AF_INET
    client = topo.run(topo.a, lambda: socket.socket(family, socket.SOCK_DGRAM))
    server = topo.run(topo.b, lambda: socket.socket(family, socket.SOCK_DGRAM))
    try:
        client.bind((here, PORT))
        server.bind((there, PORT + 1))
        client.settimeout(0.5)
        server.settimeout(0.5)
        server.sendto(b"early", (here, PORT))
        with pytest.raises(TimeoutError):
            client.recvfrom(64)
        client.sendto(b"request", (there, PORT + 1))  # once: it must pass on its first datagram
        data, peer = server.recvfrom(64)
        assert data == b"request"
        server.sendto(b"answer", peer)
        assert client.recvfrom(64)[0] == b"answer"
    finally:
        client.close()
        server.close()
    counters = maps.counters.read()
    assert counters["denied_auth_required"] == 1
    assert counters["established"] >= 1


def test_established_flow_stops_within_a_second_of_the_auth_entry_removal(
    topo: Topology, datapath: Datapath, cluster: PinnedMaps
) -> None:
    attach(topo, datapath, topo.link_a, topo.link_b)
    listener = topo.run(topo.b, lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM))
    listener.bind((B4, PORT))
    listener.listen(1)
    last_seen = [0.0]

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(3)
            try:
                while conn.recv(100):
                    last_seen[0] = time.monotonic()
            except OSError:
                return

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    client = topo.run(topo.a, lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM))
    client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    client.connect((B4, PORT))
    try:
        for _ in range(20):
            client.send(b"m")
            time.sleep(0.01)
        assert last_seen[0] > 0
        cluster.auth.delete_many([AuthKey(B, A, 0)])
        removed = time.monotonic()
        while time.monotonic() - removed < 1.5:
            client.send(b"m")
            time.sleep(0.01)
    finally:
        client.close()
        listener.close()
        thread.join(4)
    assert last_seen[0] - removed < 1.0
    assert cluster.counters.read()["denied_auth_required"] >= 1


def test_bridged_forwarding_keeps_the_port_a_packet_entered_through(
    datapath: Datapath, maps: PinnedMaps
) -> None:
    """Pods on one bridge: at a port's tc egress, skb->ingress_ifindex is the port the frame came in on."""
    tag = secrets.token_hex(2)
    node, pods = f"adp-{tag}-br", [f"adp-{tag}-p{i}" for i in range(3)]
    ports = [f"adp{tag}p{i}" for i in range(3)]
    made: list[str] = []
    try:
        for ns in (node, *pods):
            sh("ip", "netns", "add", ns)
            made.append(ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "-n", node, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", node, "link", "set", "br0", "up")
        for i, (pod, port) in enumerate(zip(pods, ports, strict=True)):
            sh("ip", "link", "add", port, "netns", node, "type", "veth", "peer", "name", "eth0", "netns", pod)
            sh("ip", "-n", node, "link", "set", port, "master", "br0", "up")
            sh("ip", "-n", pod, "addr", "add", f"10.204.0.{i + 1}/24", "dev", "eth0")
            sh("ip", "-n", pod, "link", "set", "eth0", "up")
        node_path, pod_paths = Path("/run/netns") / node, [Path("/run/netns") / p for p in pods]
        index = [run_in_netns(node_path, functools.partial(socket.if_nametoindex, p)) for p in ports]
        maps.endpoints.update_many(
            {
                ip_network("10.204.0.1/32"): EndpointOwner(index[0], ENDPOINT_F_ROUTE),
                ip_network("10.204.0.2/32"): EndpointOwner(index[1], ENDPOINT_F_ROUTE),
            }
        )  # the third port carries no program and owns nothing: the underlay
        run_in_netns(node_path, lambda: [datapath.attach(index[i], l3=False) for i in (0, 1)])
        rx = run_in_netns(pod_paths[1], lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
        rx.bind(("10.204.0.2", PORT))
        rx.settimeout(1)

        def send() -> None:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx:
                tx.sendto(b"bridged", ("10.204.0.2", PORT))

        run_in_netns(pod_paths[0], send)
        assert rx.recv(64) == b"bridged"  # entered through p0, which owns 10.204.0.1: passes
        header = bytearray(pk.ipv4("10.204.0.1", "10.204.0.2", pk.UDP, pk.udp(PORT, PORT, b"forged")))
        struct.pack_into("!H", header, 10, checksum(bytes(header[:20])))
        frame = mac(pod_paths[1], "eth0") + pk.SRC_MAC + struct.pack("!H", pk.ETH_P_IP) + bytes(header)

        def forge() -> None:
            with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as raw:
                raw.bind(("eth0", 0))
                raw.send(frame)

        run_in_netns(pod_paths[2], forge)
        rx.settimeout(0.4)
        with pytest.raises(TimeoutError):
            rx.recv(64)
        rx.close()
        assert maps.counters.read()["denied_source_wrong_interface"] >= 1  # flooded to both ports, maybe
    finally:
        for ns in reversed(made):
            subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)
