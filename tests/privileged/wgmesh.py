"""Three nodes in network namespaces, joined by an underlay bridge, each with a WireGuard interface.

    node A 192.168.77.1 ┐                      workload addresses (on each node's lo):
    node B 192.168.77.2 ┼── bridge (netns U)     A 10.77.1.1, B 10.77.2.1, C 10.77.3.1
    node C 192.168.77.3 ┘                      cluster state: node N hosts 10.77.N.0/24

Peers, preshared keys and routes are what authd computes from cluster state (authd/encryption/peers.py).
Everything made here is removed on close, backends first (a wireguard-go process keeps its namespace).
"""

from __future__ import annotations

import secrets
import socket
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from authd.cluster.model import ClusterState
from authd.datapath.netns import run_in_netns
from authd.encryption.backend import WireGuardBackend, open_backend
from authd.encryption.keys import KeyPair
from authd.encryption.peers import PeerKeys, desired_peers, tunnel_routes
from authd.encryption.routes import sync_routes
from tests.fakes.cluster import endpoint, node, state

T = TypeVar("T")
PORT = 51820
NAMES = ("node-a", "node-b", "node-c")
WIREGUARD_GO = Path("/usr/bin/wireguard-go")


def sh(*args: str) -> str:
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout


def underlay(index: int) -> str:
    return f"192.168.77.{index + 1}"


def workload(index: int) -> str:
    return f"10.77.{index + 1}.1"


@dataclass
class Member:
    name: str
    netns: str
    key: KeyPair
    backend: WireGuardBackend | None = None
    psks: dict[str, bytes] = field(default_factory=dict)


class Mesh:
    """The namespaces and the bridge; with ``tunnel``, one WireGuard interface per node, peers and routes."""

    def __init__(self, backend: str, runtime: Path, *, tunnel: bool = True) -> None:
        self.tag = secrets.token_hex(2)
        self.interface = f"awg{self.tag}"
        self.backend_choice = backend
        self.runtime = runtime
        self.bridge_ns = f"awg-{self.tag}-u"
        self.members = {
            name: Member(name, f"awg-{self.tag}-{name[-1]}", KeyPair.generate()) for name in NAMES
        }
        self.state = state(
            [node(name, underlay(i)) for i, name in enumerate(NAMES)],
            [endpoint(f"w{i}", name, f"10.77.{i + 1}.0/24") for i, name in enumerate(NAMES)],
        )
        self._made: list[str] = []
        try:
            self._build(tunnel=tunnel)
        except BaseException:
            self.close()
            raise

    def path(self, netns: str) -> Path:
        return Path("/run/netns") / netns

    def run(self, name: str, fn: Callable[[], T]) -> T:
        return run_in_netns(self.path(self.members[name].netns), fn)

    def in_ns(self, name: str, *argv: str) -> str:
        return sh("nsenter", f"--net={self.path(self.members[name].netns)}", *argv)

    def _build(self, *, tunnel: bool) -> None:
        sh("ip", "netns", "add", self.bridge_ns)
        self._made.append(self.bridge_ns)
        sh("ip", "-n", self.bridge_ns, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", self.bridge_ns, "link", "set", "br0", "up")
        for index, member in enumerate(self.members.values()):
            sh("ip", "netns", "add", member.netns)
            self._made.append(member.netns)
            sh("ip", "-n", member.netns, "link", "set", "lo", "up")
            port = f"u{self.tag}{index}"
            sh("ip", "link", "add", port, "netns", self.bridge_ns, "type", "veth", "peer", "name", "eth0",
               "netns", member.netns)  # fmt: skip
            sh("ip", "-n", self.bridge_ns, "link", "set", port, "master", "br0", "up")
            sh("ip", "-n", member.netns, "addr", "add", f"{underlay(index)}/24", "dev", "eth0")
            sh("ip", "-n", member.netns, "link", "set", "eth0", "up")
            sh("ip", "-n", member.netns, "addr", "add", f"{workload(index)}/32", "dev", "lo")
        for a in self.members.values():
            for b in self.members.values():
                if a.name < b.name:
                    psk = secrets.token_bytes(32)  # the channel derives it; any shared secret will do here
                    a.psks[b.name] = b.psks[a.name] = psk
        for member in self.members.values():
            if tunnel:
                self.start(member.name)
                self.apply(member.name)

    def start(self, name: str) -> None:
        member = self.members[name]

        def start() -> WireGuardBackend:
            backend = open_backend(
                self.backend_choice,  # type: ignore[arg-type]
                self.interface,
                wireguard_go=WIREGUARD_GO,
                runtime_dir=self.runtime / name,
            )
            backend.configure(private_key=member.key, listen_port=PORT)
            return backend

        member.backend = self.run(name, start)

    def keys_seen_by(self, name: str) -> dict[str, PeerKeys]:
        member = self.members[name]
        return {
            other.name: PeerKeys(other.key.public, member.psks[other.name])
            for other in self.members.values()
            if other.name != name
        }

    def apply(self, name: str, cluster: ClusterState | None = None) -> None:
        """Peers and routes of ``name`` from cluster state, as authd's reconcile does."""
        member = self.members[name]
        backend = member.backend
        assert backend is not None
        current = cluster or self.state
        peers = desired_peers(current, name, self.keys_seen_by(name), PORT)
        # In the node's namespace, as the daemon would run: the kernel backend reaches its link there only.
        present = {peer.public_key for peer in self.run(name, backend.status).peers}
        wanted = {peer.public_key for peer in peers.values()}
        self.run(name, lambda: backend.configure(peers=peers.values(), remove=present - wanted))
        self.run(name, lambda: sync_routes(backend.ifindex, tunnel_routes(current, name)))

    def close(self) -> None:
        for member in self.members.values():
            if member.backend is not None:
                backend = member.backend
                self.run(member.name, lambda b=backend: b.close(remove=True))  # type: ignore[misc]
                member.backend = None
        for ns in reversed(self._made):
            subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)
        self._made.clear()


class Capture:
    """Every frame on every interface of ``netns`` (an underlay bridge), by a raw socket until stopped."""

    def __init__(self, netns: Path) -> None:
        def open_socket() -> socket.socket:
            sock = socket.socket(
                socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003)
            )  # ETH_P_ALL, unbound: every interface of the netns
            sock.settimeout(0.1)
            return sock

        self._sock = run_in_netns(netns, open_socket)
        self.frames: list[bytes] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, name="capture")
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                self.frames.append(self._sock.recv(65536))
            except TimeoutError:
                continue

    def stop(self) -> list[bytes]:
        self._stop.set()
        self._thread.join()
        self._sock.close()
        return self.frames
