"""WireGuard between nodes in network namespaces, with wireguard-go and, where the kernel can create a
wireguard link (the QEMU guest tier), kernel WireGuard: what crosses the underlay, who may send as whom,
and peer removal."""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from authd.datapath.netns import run_in_netns
from authd.encryption import kernel
from tests.fakes.cluster import endpoint, node, state
from tests.privileged.wgmesh import NAMES, PORT, Capture, Mesh, underlay, workload

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
    capture = Capture(mesh)
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
