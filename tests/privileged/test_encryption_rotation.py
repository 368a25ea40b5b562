"""Node key rotations under live traffic, with real WireGuard (wireguard-go here; kernel WireGuard in the
QEMU guest tier): authd's handover (authd/encryption/handover.py) runs on two nodes, and the test plays
their channel, handing each node, at every step, the generations the other announces and the generation
of it the other sends to. A rotation that replaced a key on one interface (SwapRotation) loses the
datagrams of the handshake that follows; these tests count every datagram and every retransmission."""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import ip_address
from pathlib import Path

import pytest

from authd.encryption.backend import WireGuardBackend, open_backend
from authd.encryption.handover import Handover, Step
from authd.encryption.interfaces import Interfaces
from authd.encryption.links import Announced, Generations, Remote
from authd.encryption.peers import workload_prefixes
from tests.privileged.test_encryption_tunnel import kernel_wireguard
from tests.privileged.wgmesh import NAMES, PORT, WIREGUARD_GO, Capture, Mesh, underlay, workload

pytestmark = pytest.mark.privileged
A, B = NAMES[:2]
UDP_PORT, TCP_PORT = 7801, 7802
ROTATIONS = 10
STEP = 0.02
"""Seconds between two steps of each node's handover (the daemon steps on every change)."""
ROTATION_TIMEOUT = 10.0
TCP_INFO_TOTAL_RETRANS = 100
"""Offset of tcpi_total_retrans in struct tcp_info (linux/tcp.h): 8 bytes of u8 fields, then u32s."""


class Pair:
    """Two nodes' handovers, stepped together on a thread; the test is the channel between them."""

    def __init__(self, mesh: Mesh) -> None:
        self.mesh = mesh
        self.handovers = {name: self._handover(name) for name in (A, B)}
        self.last: dict[str, Step] = {}
        self.retired: Counter[str] = Counter()
        self.durations: list[float] = []
        self._began: dict[str, float] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.failure: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="handover")

    def _handover(self, name: str) -> Handover:
        mesh = self.mesh

        def opener(interface: str) -> WireGuardBackend:
            return open_backend(
                mesh.backend_choice,  # type: ignore[arg-type]
                interface,
                wireguard_go=WIREGUARD_GO,
                runtime_dir=mesh.runtime / name,
            )

        interfaces = Interfaces(mesh.interface, PORT, opener)
        return Handover(interfaces, Generations(1, mesh.members[name].key), time.monotonic)

    def remotes(self, name: str) -> list[Remote]:
        """What ``name``'s channel with the other node says now."""
        other = B if name == A else A
        current, previous = self.handovers[other].generations.announced()
        last = self.last.get(other)
        link = last.plan.sending.get(name) if last is not None else None
        announced = Announced(
            current, previous, PORT, self.mesh.members[name].psks[other], link.remote if link else None
        )
        index = NAMES.index(other)
        prefixes = workload_prefixes(self.mesh.state, other)
        return [Remote(other, ip_address(underlay(index)), prefixes, announced)]

    def step(self) -> None:
        with self._lock:
            for name, handover in self.handovers.items():
                remotes = self.remotes(name)
                step = self.mesh.run(name, lambda h=handover, r=remotes: h.step(r))  # type: ignore[misc]
                self.last[name] = step
                if step.retired is not None:
                    self.retired[step.retired] += 1
                    self.durations.append(time.monotonic() - self._began.pop(name))

    def _loop(self) -> None:
        try:
            while not self._stop.wait(STEP):
                self.step()
        except BaseException as err:  # noqa: BLE001 - reported by the test, in its thread
            self.failure = err

    def start(self) -> None:
        self._thread.start()

    def settled(self) -> bool:
        """Both nodes send through a link that has handshaken, and neither rotates."""
        for name, handover in self.handovers.items():
            last = self.last.get(name)
            if last is None or handover.generations.rotating_since is not None:
                return False
            status = self.mesh.run(name, handover.interfaces.status)
            if last.plan.sending[B if name == A else A] not in handover.interfaces.handshaken(status):
                return False
        return True

    def rotate(self, *names: str) -> None:
        """Rotate ``names`` at once, and wait until each has retired its older generation."""
        with self._lock:
            for name in names:
                self.handovers[name].rotate()
                self._began[name] = time.monotonic()
        deadline = time.monotonic() + ROTATION_TIMEOUT
        while any(self.handovers[name].generations.rotating_since is not None for name in names):
            assert self.failure is None, self.failure
            assert time.monotonic() < deadline, "a rotation did not end"
            time.sleep(STEP)

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        for name, handover in self.handovers.items():
            with contextlib.suppress(Exception):
                self.mesh.run(name, lambda h=handover: h.interfaces.close(remove=True))  # type: ignore[misc]


class UdpFlow:
    """Sequence-numbered datagrams from one workload to another at a steady rate; what arrived."""

    RATE = 1000

    def __init__(self, mesh: Mesh, source: str, target: str) -> None:
        self.target = workload(NAMES.index(target))
        self._receiver = mesh.run(target, lambda: _bound(socket.SOCK_DGRAM, self.target, UDP_PORT))
        self._sender = mesh.run(source, lambda: _bound(socket.SOCK_DGRAM, workload(NAMES.index(source)), 0))
        self._receiver.settimeout(0.2)
        self.sent = 0
        self.seen: set[int] = set()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._send), threading.Thread(target=self._receive)]
        for thread in self._threads:
            thread.start()

    def _send(self) -> None:
        started = time.monotonic()
        while not self._stop.is_set():
            self._sender.sendto(struct.pack("!Q", self.sent) + b"u" * 120, (self.target, UDP_PORT))
            self.sent += 1
            pause = started + self.sent / self.RATE - time.monotonic()
            if pause > 0:
                time.sleep(pause)

    def _receive(self) -> None:
        quiet = 0
        while quiet < 5 or not self._stop.is_set():  # after the stop, until 1 s without a datagram
            try:
                data = self._receiver.recv(2048)
            except TimeoutError:
                quiet += 1 if self._stop.is_set() else 0
                continue
            quiet = 0
            self.seen.add(struct.unpack("!Q", data[:8])[0])

    def stop(self) -> int:
        """Stop sending; the number of datagrams that never arrived."""
        self._stop.set()
        for thread in self._threads:
            thread.join()
        self._sender.close()
        self._receiver.close()
        return self.sent - len(self.seen)


class TcpFlow:
    """One TCP connection between two workloads, the client writing a marked chunk every millisecond."""

    def __init__(self, mesh: Mesh, client: str, server: str, marker: bytes) -> None:
        address = workload(NAMES.index(server))
        self._listener = mesh.run(server, lambda: _bound(socket.SOCK_STREAM, address, TCP_PORT))
        self._listener.listen(1)
        self._client = mesh.run(client, lambda: _bound(socket.SOCK_STREAM, workload(NAMES.index(client)), 0))
        self._client.connect((address, TCP_PORT))
        self._server, _ = self._listener.accept()
        self._server.settimeout(0.5)
        self._chunk = marker + b"t" * (1200 - len(marker))
        self.sent = self.received = 0
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._write), threading.Thread(target=self._read)]
        for thread in self._threads:
            thread.start()

    def _write(self) -> None:
        while not self._stop.is_set():
            self._client.sendall(self._chunk)
            self.sent += len(self._chunk)
            time.sleep(0.001)

    def _read(self) -> None:
        while True:  # after the stop, until the connection is quiet for a timeout
            try:
                data = self._server.recv(65536)
            except TimeoutError:
                if self._stop.is_set():
                    return
                continue
            if not data:
                return
            self.received += len(data)

    def retransmissions(self) -> int:
        """tcpi_total_retrans of the client's socket."""
        info = self._client.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
        total: int = struct.unpack_from("I", info, TCP_INFO_TOTAL_RETRANS)[0]
        return total

    def stop(self) -> None:
        self._stop.set()
        self._threads[0].join()
        self._threads[1].join(timeout=5.0)
        for sock in (self._client, self._server, self._listener):
            sock.close()


def _bound(kind: int, address: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, kind)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((address, port))
    return sock


def tcp_counters(mesh: Mesh, name: str) -> Counter[str]:
    """The TCP counters of ``name``'s namespace (/proc/net/snmp and /proc/net/netstat)."""
    counters: Counter[str] = Counter()
    for table in ("snmp", "netstat"):
        lines = [line.split() for line in mesh.in_ns(name, "cat", f"/proc/net/{table}").splitlines()]
        rows = [line for line in lines if line[0] in {"Tcp:", "TcpExt:"}]
        for header, values in zip(rows[::2], rows[1::2], strict=True):
            counters.update({f"{header[0]}{k}": int(v) for k, v in zip(header[1:], values[1:], strict=True)})
    return counters


RETRANSMISSIONS = (
    "Tcp:RetransSegs",
    "TcpExt:TCPFastRetrans",
    "TcpExt:TCPTimeouts",
    "TcpExt:TCPLossProbes",
    "TcpExt:TCPDSACKRecv",
    "TcpExt:TCPSACKReorder",
)
"""The counters the figures show: retransmissions by cause, and the reordering the receiver reported."""


@pytest.fixture(params=["userspace", "kernel"])
def pair(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Pair]:
    if request.param == "kernel" and not kernel_wireguard():
        pytest.skip("this kernel cannot create a wireguard link (the QEMU guest tier runs these)")
    mesh = Mesh(request.param, tmp_path, tunnel=False)
    made: Pair | None = None
    try:
        made = Pair(mesh)
        made.start()
        deadline = time.monotonic() + ROTATION_TIMEOUT
        while not made.settled():
            assert made.failure is None, made.failure
            assert time.monotonic() < deadline, "the nodes' first links did not handshake"
            time.sleep(STEP)
        yield made
    finally:
        if made is not None:
            made.close()
        mesh.close()


@dataclass
class Run:
    """What ten rotations under the flows left: losses, retransmissions, what crossed the underlay."""

    lost: tuple[int, int]
    sent: int
    tcp: TcpFlow
    total_retrans: int
    counted: dict[str, Counter[str]]
    frames: list[bytes]
    marker: bytes


def rotate_under_flows(pair: Pair, rotating: tuple[str, ...]) -> Run:
    """Ten rotations of ``rotating`` (at once) during a UDP flow each way and a TCP flow from A to B."""
    mesh = pair.mesh
    marker = b"AUTHD-MARKER-" + bytes(mesh.tag, "ascii") * 8
    before = {name: tcp_counters(mesh, name) for name in (A, B)}
    capture = Capture(mesh.path(mesh.bridge_ns))
    forth, back = UdpFlow(mesh, A, B), UdpFlow(mesh, B, A)
    tcp = TcpFlow(mesh, A, B, marker)
    try:
        time.sleep(0.5)
        for _ in range(ROTATIONS):
            pair.rotate(*rotating)
            time.sleep(0.2)
        time.sleep(0.5)
    finally:
        lost = (forth.stop(), back.stop())
        total_retrans = tcp.retransmissions()
        tcp.stop()
        frames = capture.stop()
    counted = {name: tcp_counters(mesh, name) - before[name] for name in (A, B)}
    durations = pair.durations
    shown = {name: {k: v for k, v in counted[name].items() if k in RETRANSMISSIONS} for name in (A, B)}
    print(  # noqa: T201 - the figures the report quotes
        f"rotations {len(durations)} {dict(pair.retired)}, ms to retire: max {max(durations) * 1000:.0f}, "
        f"mean {sum(durations) / len(durations) * 1000:.0f}; udp sent {forth.sent}+{back.sent}, "
        f"lost {lost}; tcp bytes {tcp.sent}, total_retrans {total_retrans}, counters {shown}"
    )
    return Run(lost, forth.sent, tcp, total_retrans, counted, frames, marker)


ROTATING = pytest.mark.parametrize("rotating", [(A,), (A, B)], ids=["one-node", "both-nodes-at-once"])


@ROTATING
def test_ten_rotations_lose_no_datagram_and_keep_tcp_flowing(pair: Pair, rotating: tuple[str, ...]) -> None:
    run = rotate_under_flows(pair, rotating)
    assert pair.failure is None, pair.failure
    assert pair.retired == {"done": ROTATIONS * len(rotating)}  # none forced by the timeout
    assert run.sent > ROTATIONS * 200  # the flow ran throughout: the count below could fail
    assert run.lost == (0, 0)
    assert run.tcp.received == run.tcp.sent > 0
    assert {name: run.counted[name]["TcpExt:TCPTimeouts"] for name in (A, B)} == {A: 0, B: 0}  # no stall
    assert not [frame for frame in run.frames if run.marker in frame]
    ports = {
        int.from_bytes(f[36:38], "big") for f in run.frames if len(f) > 42 and f[23] == socket.IPPROTO_UDP
    }
    assert len(ports & {PORT, PORT + 1, PORT + 2, PORT + 3}) >= 3  # the links moved between interfaces


@pytest.mark.xfail(
    reason="known limitation: 1 to 4 fast retransmits in about one run of four; the receiver's DSACK shows "
    "the segment was not lost but overtaken (the route switch reorders segments between two interfaces)",
    strict=False,
)
@ROTATING
def test_ten_rotations_cause_no_tcp_retransmission(pair: Pair, rotating: tuple[str, ...]) -> None:
    run = rotate_under_flows(pair, rotating)
    assert pair.failure is None, pair.failure
    assert run.tcp.received == run.tcp.sent > 0
    assert run.total_retrans == 0
    assert {name: run.counted[name]["Tcp:RetransSegs"] for name in (A, B)} == {A: 0, B: 0}
