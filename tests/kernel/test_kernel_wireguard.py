"""Kernel WireGuard works in the guest: two network namespaces, a veth underlay, a ``wireguard`` link each.

The links are made over netlink (``ip link add ... type wireguard``) and keyed with wireguard-tools' ``wg``.
A marker sent through the tunnel arrives, and a capture on the underlay veth sees only WireGuard's
encrypted transport messages, never the marker.
"""

from __future__ import annotations

import secrets
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from authd.datapath.netns import run_in_netns

MARKER = b"authd kernel WireGuard marker"
PORT = 51820
ETH_P_ALL = 0x0003
ETH_P_IP = 0x0800
WG_TRANSPORT_DATA = 4


def sh(*args: str, stdin: str | None = None) -> str:
    return subprocess.run(args, check=True, capture_output=True, text=True, input=stdin).stdout


@dataclass(frozen=True)
class Tunnel:
    a: Path
    b: Path
    underlay_b: str


@pytest.fixture
def tunnel(tmp_path: Path) -> Iterator[Tunnel]:
    """A (10.203.0.1, tunnel 10.204.0.1) and B (10.203.0.2, tunnel 10.204.0.2), peers of each other."""
    tag = secrets.token_hex(2)
    names = {side: f"kwg-{tag}-{side}" for side in "ab"}
    made: list[str] = []
    try:
        keys = {}
        for side, ns in names.items():
            sh("ip", "netns", "add", ns)
            made.append(ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            private = sh("wg", "genkey")
            (tmp_path / side).write_text(private)
            keys[side] = sh("wg", "pubkey", stdin=private).strip()
        sh("ip", "link", "add", f"kwg{tag}a", "netns", names["a"], "type", "veth",
           "peer", "name", f"kwg{tag}b", "netns", names["b"])  # fmt: skip
        for index, (side, ns) in enumerate(names.items(), start=1):
            other = "b" if side == "a" else "a"
            sh("ip", "-n", ns, "addr", "add", f"10.203.0.{index}/24", "dev", f"kwg{tag}{side}")
            sh("ip", "-n", ns, "link", "set", f"kwg{tag}{side}", "up")
            sh("ip", "-n", ns, "link", "add", "wg0", "type", "wireguard")
            sh("nsenter", f"--net=/run/netns/{ns}", "wg", "set", "wg0", "private-key", str(tmp_path / side),
               "listen-port", str(PORT), "peer", keys[other], "endpoint", f"10.203.0.{3 - index}:{PORT}",
               "allowed-ips", f"10.204.0.{3 - index}/32")  # fmt: skip
            sh("ip", "-n", ns, "addr", "add", f"10.204.0.{index}/24", "dev", "wg0")
            sh("ip", "-n", ns, "link", "set", "wg0", "up")
        yield Tunnel(Path("/run/netns", names["a"]), Path("/run/netns", names["b"]), f"kwg{tag}b")
    finally:
        for ns in reversed(made):
            subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)


def wireguard_payloads(frames: list[bytes]) -> list[bytes]:
    """The UDP payloads to WireGuard's port among captured Ethernet frames carrying IPv4."""
    payloads = []
    for frame in frames:
        if len(frame) < 14 or struct.unpack_from("!H", frame, 12)[0] != ETH_P_IP:
            continue
        ip = frame[14:]
        header = (ip[0] & 0x0F) * 4
        if ip[9] == socket.IPPROTO_UDP and struct.unpack_from("!H", ip, header + 2)[0] == PORT:
            payloads.append(ip[header + 8 :])
    return payloads


def test_a_marker_crosses_kernel_wireguard_and_never_appears_on_the_underlay(tunnel: Tunnel) -> None:
    capture = run_in_netns(tunnel.b, lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0))
    receiver = run_in_netns(tunnel.b, lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
    sender = run_in_netns(tunnel.a, lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
    with capture, receiver, sender:
        capture.bind((tunnel.underlay_b, ETH_P_ALL))  # the underlay only, from here on (bind applies htons)
        receiver.bind(("10.204.0.2", 9000))
        receiver.settimeout(0.5)
        received = b""
        deadline = time.monotonic() + 20
        while not received and time.monotonic() < deadline:  # the first datagrams wait for the handshake
            sender.sendto(MARKER, ("10.204.0.2", 9000))
            try:
                received = receiver.recv(100)
            except TimeoutError:
                continue
        assert received == MARKER

        frames = []
        while True:
            try:
                frames.append(capture.recv(65535, socket.MSG_DONTWAIT))
            except BlockingIOError:
                break
    assert not [frame for frame in frames if MARKER in frame]
    payloads = wireguard_payloads(frames)
    assert any(payload[0] == WG_TRANSPORT_DATA for payload in payloads), payloads
    assert (
        sh("ip", "netns", "exec", tunnel.b.name, "wg", "show", "wg0", "latest-handshakes").split()[1] != "0"
    )
