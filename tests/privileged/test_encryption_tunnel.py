"""WireGuard between nodes in network namespaces, with wireguard-go and, where the kernel can create a
wireguard link (the QEMU guest tier), kernel WireGuard: what crosses the underlay, who may send as whom,
peer removal, and the datapath's binding of remote workloads' addresses to the tunnel."""

from __future__ import annotations

import json
import os
import secrets
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from ipaddress import ip_network
from pathlib import Path

import pytest

from authd.datapath import clock
from authd.datapath.events import FlowEvent, decode
from authd.datapath.layout import (
    ENDPOINT_F_ROUTE,
    IDENTITY_ANY,
    AuthType,
    Direction,
    DropReason,
    FlowLevel,
    Verdict,
)
from authd.datapath.loader import Datapath
from authd.datapath.maps import AuthKey, EndpointOwner, IpcacheEntry, PinnedMaps, PolicyKey, RuntimeConfig
from authd.datapath.netns import run_in_netns
from authd.datapath.ringbuf import RingBuffer
from authd.encryption import kernel
from tests.fakes import packets as pk
from tests.fakes.cluster import endpoint, node, state
from tests.privileged.wgmesh import NAMES, PORT, Capture, Mesh, sh, underlay, workload

pytestmark = pytest.mark.privileged
A, B, C = NAMES
APP = 7777


def kernel_wireguard() -> bool:
    """Whether this kernel can create a wireguard link (asked in a namespace of its own)."""
    probe = f"awg-probe-{secrets.token_hex(2)}"
    subprocess.run(["ip", "netns", "add", probe], check=True)
    try:
        return run_in_netns(Path("/run/netns") / probe, kernel.available)
    finally:
        subprocess.run(["ip", "netns", "del", probe], check=True)


@pytest.fixture(params=["userspace", "kernel"])
def mesh(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Mesh]:
    if request.param == "kernel" and not kernel_wireguard():
        if os.environ.get("AUTHD_GUEST_JOB"):  # the QEMU guest tier (tests/kernel/test_encryption_kernel.py)
            pytest.fail("kernel WireGuard is required in the guest, and its kernel cannot create the link")
        pytest.skip("this kernel cannot create a wireguard link (the QEMU guest tier runs these)")
    made = Mesh(request.param, tmp_path)
    try:
        yield made
    finally:
        made.close()


def udp(mesh: Mesh, name: str, address: str, port: int = 0) -> socket.socket:
    def make() -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((address, port))
        sock.settimeout(1.0)
        return sock

    return mesh.run(name, make)


def deliver(mesh: Mesh, source: tuple[str, str], target: str, payload: bytes) -> bytes | None:
    """Send one datagram from ``source`` (node, address) to ``target``'s workload; what arrived, if any."""
    receiver = udp(mesh, target, workload(NAMES.index(target)), APP)
    sender = udp(mesh, source[0], source[1])
    try:
        receiver.settimeout(0.5)
        for _ in range(3):  # the first one may wait for a handshake
            sender.sendto(payload, (workload(NAMES.index(target)), APP))
            try:
                return receiver.recv(2048)
            except TimeoutError:
                continue
        return None
    finally:
        sender.close()
        receiver.close()


def test_workload_traffic_crosses_the_underlay_only_encrypted(mesh: Mesh) -> None:
    capture = Capture(mesh.path(mesh.bridge_ns))
    marker = b"AUTHD-MARKER-" + bytes(mesh.tag, "ascii") * 8
    try:
        for _ in range(5):
            assert deliver(mesh, (A, workload(0)), B, marker) == marker
    finally:
        frames = capture.stop()
    assert not [frame for frame in frames if marker in frame]
    wireguard = [f for f in frames if len(f) > 42 and int.from_bytes(f[36:38], "big") == PORT]
    assert len(wireguard) >= 5  # the capture saw the tunnel's datagrams: the check above could fail


def test_a_third_node_cannot_send_as_another_nodes_workload(mesh: Mesh) -> None:
    claimed = "10.77.2.9"  # inside node B's prefix; node C is in cluster state, with a peer on node A
    mesh.in_ns(C, "ip", "addr", "add", f"{claimed}/32", "dev", "lo")
    assert deliver(mesh, (C, workload(2)), A, b"from c") == b"from c"
    assert deliver(mesh, (C, claimed), A, b"c as b") is None
    assert deliver(mesh, (B, workload(1)), A, b"from b") == b"from b"


def test_a_node_removed_from_cluster_state_loses_its_peer_at_once(mesh: Mesh) -> None:
    assert deliver(mesh, (C, workload(2)), A, b"c") == b"c"
    smaller = state(
        [node(name, underlay(i)) for i, name in enumerate(NAMES) if name != C],
        [endpoint(f"w{i}", name, f"10.77.{i + 1}.0/24") for i, name in enumerate(NAMES) if name != C],
    )
    started = time.monotonic()
    mesh.apply(A, smaller)
    backend = mesh.members[A].backend
    assert backend is not None
    assert mesh.run(A, backend.status).peer(mesh.members[C].key.public) is None
    assert time.monotonic() - started < 1.0
    assert deliver(mesh, (C, workload(2)), A, b"c again") is None
    routes = mesh.in_ns(A, "ip", "route", "show", "dev", mesh.interface)
    assert "10.77.3.0/24" not in routes
    assert "10.77.2.0/24" in routes


# ------------------------------------------------------------------------ the datapath's tunnel binding

GUARDED = "10.77.1.2"  # a workload of node A behind a veth, where authd's programs run
W, RB, RC = 300, 400, 500  # identity handles on node A: its workload, B's and C's
NODE_B, NODE_C = 1, 2


class Guarded:
    """Node A enforcing: a workload behind a veth, authd's programs on the veth and on the tunnel.

    The workload accepts B's and C's workloads only authenticated, and the auth map holds both pairs:
    what lets a packet claiming B's address pass, unless the tunnel binds it.
    """

    def __init__(self, mesh: Mesh, datapath: Datapath, maps: PinnedMaps) -> None:
        self.mesh = mesh
        self.datapath = datapath
        self.maps = maps
        self.netns = f"awg-{mesh.tag}-w"
        self.veth = f"awg{mesh.tag}w"
        node_a = mesh.members[A].netns
        sh("ip", "netns", "add", self.netns)
        try:
            self._build(node_a)
        except BaseException:
            self.close()
            raise

    def _build(self, node_a: str) -> None:
        mesh, maps, datapath = self.mesh, self.maps, self.datapath
        sh("ip", "-n", self.netns, "link", "set", "lo", "up")
        sh("ip", "link", "add", self.veth, "netns", node_a, "type", "veth", "peer", "name", "eth0",
           "netns", self.netns)  # fmt: skip
        sh("ip", "-n", node_a, "addr", "add", "10.77.1.254/32", "dev", self.veth)
        sh("ip", "-n", node_a, "link", "set", self.veth, "up")
        sh("ip", "-n", node_a, "route", "add", f"{GUARDED}/32", "dev", self.veth)
        sh("ip", "-n", self.netns, "addr", "add", f"{GUARDED}/32", "dev", "eth0")
        sh("ip", "-n", self.netns, "link", "set", "eth0", "up")
        sh("ip", "-n", self.netns, "route", "add", "10.77.1.254/32", "dev", "eth0")
        sh("ip", "-n", self.netns, "route", "add", "default", "via", "10.77.1.254")
        # Forwarding, and no reverse-path filter: without authd the kernel would deliver a spoofed packet.
        for key in (
            "net.ipv4.ip_forward=1",
            "net.ipv4.conf.all.rp_filter=0",
            "net.ipv4.conf.eth0.rp_filter=0",
        ):
            mesh.in_ns(A, "sysctl", "-qw", key)
        backend = mesh.members[A].backend
        assert backend is not None
        self.tunnel = mesh.run(A, lambda: backend.ifindex)
        self.veth_index = mesh.run(A, lambda: socket.if_nametoindex(self.veth))
        maps.endpoints.update_many(
            {ip_network(f"{GUARDED}/32"): EndpointOwner(self.veth_index, ENDPOINT_F_ROUTE)}
        )
        maps.ipcache.update_many(
            {
                ip_network(f"{GUARDED}/32"): IpcacheEntry(W, 0),
                ip_network("10.77.2.0/24"): IpcacheEntry(RB, NODE_B),
                ip_network("10.77.3.0/24"): IpcacheEntry(RC, NODE_C),
            }
        )
        maps.policy.update_many({PolicyKey(W, IDENTITY_ANY, Direction.INGRESS): AuthType.SPIRE})
        expiry = datetime.now(UTC) + timedelta(minutes=5)
        maps.auth.update_many({AuthKey(W, RB, NODE_B): expiry, AuthKey(W, RC, NODE_C): expiry})
        mesh.run(A, lambda: datapath.attach(self.veth_index, l3=False))
        mesh.run(A, lambda: datapath.attach(self.tunnel, l3=True))
        self.bind(self.tunnel)

    def close(self) -> None:
        """The workload's namespace, and with it the veth pair."""
        subprocess.run(["ip", "netns", "del", self.netns], check=False, capture_output=True)

    def bind(self, tunnel: int) -> None:
        self.datapath.configure(RuntimeConfig(FlowLevel.FIRST, 10**9, tunnel))

    def receiver(self) -> socket.socket:
        def make() -> socket.socket:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind((GUARDED, APP))
            sock.settimeout(0.5)
            return sock

        return run_in_netns(Path("/run/netns") / self.netns, make)

    def cleartext_from_b(self, payload: bytes) -> bytes:
        """A datagram claiming B's workload, sent on B's underlay port straight to node A, unencrypted."""
        udp = struct.pack("!HHHH", 4444, APP, 8 + len(payload), 0) + payload
        header = bytearray(pk.ipv4(workload(1), GUARDED, pk.UDP, udp))
        struct.pack_into("!H", header, 10, checksum(bytes(header[:20])))
        text = self.mesh.in_ns(A, "ip", "-br", "link", "show", "eth0").split()[2]
        mac = bytes.fromhex(text.replace(":", ""))
        frame = mac + pk.SRC_MAC + struct.pack("!H", pk.ETH_P_IP) + bytes(header)

        def send() -> None:
            with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as raw:
                raw.bind(("eth0", 0))
                raw.send(frame)

        self.mesh.run(B, send)
        return payload

    def counters(self, pin_dir: Path) -> dict[str, int]:
        """What `authd bpf counters` prints."""
        config = self.mesh.runtime / "authd.toml"
        config.write_text(f'[datapath]\npin_dir = "{pin_dir}"\n')
        out = subprocess.run(
            [sys.executable, "-m", "authd", "bpf", "counters", "--json", "--config", str(config)],
            capture_output=True, text=True, check=True, timeout=60,
        ).stdout  # fmt: skip
        return {row["counter"]: row["value"] for row in map(json.loads, out.splitlines())}


@pytest.fixture
def guarded(mesh: Mesh, datapath: Datapath, maps: PinnedMaps) -> Iterator[Guarded]:
    made = Guarded(mesh, datapath, maps)
    try:
        yield made
    finally:
        made.close()


def checksum(header: bytes) -> int:
    total: int = sum(struct.unpack(f"!{len(header) // 2}H", header))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def received(sock: socket.socket, wanted: bytes) -> bool:
    try:
        while True:
            if sock.recv(2048) == wanted:
                return True
    except TimeoutError:
        return False


def flows(ring: RingBuffer) -> list[FlowEvent]:
    return [e for r in ring.read() if isinstance(e := decode(r, clock.tai_offset_ns()), FlowEvent)]


def test_a_cleartext_packet_claiming_a_remote_workload_is_dropped_not_encrypted(
    mesh: Mesh, guarded: Guarded, ring: RingBuffer, pin_dir: Path
) -> None:
    receiver = guarded.receiver()
    try:
        # The same auth entry (W, B's workload, node B) is live throughout; only the binding changes.
        guarded.bind(0)
        assert received(receiver, guarded.cleartext_from_b(b"clear, unbound"))  # so the check can fail
        flows(ring)
        guarded.bind(guarded.tunnel)
        assert not received(receiver, guarded.cleartext_from_b(b"clear, bound"))
        assert guarded.counters(pin_dir)["denied_not_encrypted"] == 1
        (dropped,) = flows(ring)
        assert (dropped.drop_reason, dropped.encrypted, str(dropped.src)) == (
            DropReason.NOT_ENCRYPTED,
            False,
            workload(1),
        )
        assert dropped.ifindex == guarded.veth_index
        # Through the tunnel, WireGuard decrypted it from B's peer: it passes, and its flow says so.
        sender = udp(mesh, B, workload(1))
        try:
            for _ in range(3):  # the first may wait for a handshake
                sender.sendto(b"sealed", (GUARDED, APP))
                if received(receiver, b"sealed"):
                    break
            else:
                pytest.fail("the datagram through the tunnel did not arrive")
        finally:
            sender.close()
    finally:
        receiver.close()
    events = flows(ring)
    assert events
    assert all(e.verdict is Verdict.ALLOWED and e.encrypted for e in events)
    assert {e.ifindex for e in events} == {guarded.tunnel}  # judged where it entered: the tunnel
    counters = guarded.counters(pin_dir)
    assert counters["denied_not_encrypted"] == 1
    assert counters["allowed_auth"] >= 1


def test_a_flow_into_the_tunnel_is_reported_encrypted_once(
    mesh: Mesh, guarded: Guarded, ring: RingBuffer
) -> None:
    receiver = udp(mesh, B, workload(1), APP)

    def send() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind((GUARDED, 5555))
            for _ in range(8):  # over more than one re-check of the flow (0.5 s)
                sock.sendto(b"out", (workload(1), APP))
                time.sleep(0.1)

    try:
        run_in_netns(Path("/run/netns") / guarded.netns, send)
        assert received(receiver, b"out")
    finally:
        receiver.close()
    events = flows(ring)
    assert all(e.direction is Direction.EGRESS and e.verdict is Verdict.ALLOWED for e in events)
    at_veth = [e for e in events if e.ifindex == guarded.veth_index]
    into_tunnel = [e for e in events if e.ifindex == guarded.tunnel]
    assert [e.encrypted for e in at_veth] == [False]  # not routed yet: the workload's hook cannot know
    assert [(e.encrypted, str(e.src), str(e.dst)) for e in into_tunnel] == [(True, GUARDED, workload(1))]
