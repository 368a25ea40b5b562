"""Restarting authd (stop, then start, not ``bpf unload``) while traffic flows: no packet lost, maps kept.

What is measured: a UDP stream with sequence numbers (1 datagram/ms; any gap is a lost packet) and a TCP
stream (the client's TcpRetransSegs in its namespace must not grow: a dropped segment is retransmitted),
both between identities whose pair needs authentication, across a stop and a start of the daemon.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from datetime import UTC, datetime, timedelta
from ipaddress import ip_network
from pathlib import Path

import pytest

from authd.datapath.layout import AuthType, Direction
from authd.datapath.loader import attached_prog_ids
from authd.datapath.maps import AuthKey, IpcacheEntry, PinnedMaps, PolicyKey
from tests.privileged.daemon import Authd
from tests.privileged.topology import A4, B4, Topology

pytestmark = pytest.mark.privileged

A, B = 300, 400


def retransmits(topo: Topology, netns: str) -> int:
    """TcpRetransSegs of a namespace (its /proc/net/snmp, read from a thread inside it)."""
    text = topo.run(netns, lambda: Path("/proc/thread-self/net/snmp").read_text())
    header, values = (line.split() for line in text.splitlines() if line.startswith("Tcp:"))
    return int(values[header.index("RetransSegs")])


class Streams:
    """A UDP stream with sequence numbers and a TCP stream from workload A to B, 1 message per ms."""

    def __init__(self, topo: Topology) -> None:
        self.stop = threading.Event()
        self.received: list[int] = []
        self.sent = 0
        self.tcp_bytes = 0
        self.udp_rx = topo.run(topo.b, lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
        self.udp_rx.bind((B4, 9000))
        self.udp_rx.settimeout(0.5)
        self.tcp_listen = topo.run(topo.b, lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM))
        self.tcp_listen.bind((B4, 9001))
        self.tcp_listen.listen(1)
        self.udp_tx = topo.run(topo.a, lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
        self.tcp_tx = topo.run(topo.a, lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM))
        self.tcp_tx.settimeout(5)
        self.tcp_tx.connect((B4, 9001))
        self.tcp_rx, _ = self.tcp_listen.accept()
        self.tcp_rx.settimeout(0.5)
        self.threads = [
            threading.Thread(target=t, daemon=True) for t in (self._send, self._recv_udp, self._recv_tcp)
        ]
        for thread in self.threads:
            thread.start()

    def _send(self) -> None:
        seq = 0
        payload = b"x" * 96
        while not self.stop.is_set():
            self.udp_tx.sendto(struct.pack("!I", seq), (B4, 9000))
            self.tcp_tx.sendall(struct.pack("!I", seq) + payload)
            seq += 1
            self.sent = seq
            time.sleep(0.001)

    def _recv_udp(self) -> None:
        while True:
            try:
                data = self.udp_rx.recv(64)
            except TimeoutError:
                if self.stop.is_set():
                    return
                continue
            self.received.append(struct.unpack("!I", data)[0])

    def _recv_tcp(self) -> None:
        while True:
            try:
                data = self.tcp_rx.recv(65536)
            except TimeoutError:
                if self.stop.is_set():
                    return
                continue
            if not data:
                return
            self.tcp_bytes += len(data)

    def finish(self) -> None:
        self.stop.set()
        self.threads[0].join()
        self.tcp_tx.close()
        for thread in self.threads[1:]:
            thread.join()
        for sock in (self.udp_rx, self.udp_tx, self.tcp_rx, self.tcp_listen):
            sock.close()


def passed(maps: PinnedMaps) -> int:
    """Packets the programs passed with an auth entry or as part of a flow it allowed."""
    counters = maps.counters.read()
    return counters["allowed_auth"] + counters["established"]


def test_restart_keeps_maps_and_loses_no_packet(topology: Topology, authd: Authd, pin_dir: Path) -> None:
    authd.start()
    link = topology.ifindex(topology.link_b)
    first_progs = topology.run(topology.node, lambda: attached_prog_ids(link))
    assert None not in first_progs
    with PinnedMaps(pin_dir) as maps:
        maps.ipcache.update_many(
            {ip_network(f"{A4}/32"): IpcacheEntry(A, 0), ip_network(f"{B4}/32"): IpcacheEntry(B, 0)}
        )
        maps.policy.update_many(
            {
                PolicyKey(B, A, Direction.INGRESS): AuthType.SPIRE,
                PolicyKey(A, B, Direction.EGRESS): AuthType.SPIRE,
            }
        )
        expires = datetime.now(UTC) + timedelta(minutes=5)
        maps.auth.update_many({AuthKey(B, A, 0): expires, AuthKey(A, B, 0): expires})
        map_ids = {m.name: m.id for m in (maps.auth._map.info, maps.ipcache._map.info, maps.policy._map.info)}

    retrans_before = retransmits(topology, topology.a)
    streams = Streams(topology)
    try:
        time.sleep(0.3)
        authd.stop()
        with PinnedMaps(pin_dir) as maps:
            allowed_while_down = passed(maps)
            time.sleep(0.3)
            assert passed(maps) > allowed_while_down  # still enforcing while down
        authd.start()
        time.sleep(0.3)
    finally:
        streams.finish()

    assert streams.received == list(range(len(streams.received)))  # in order, no gap
    assert len(streams.received) >= streams.sent - 1  # the last datagram may still be in flight at stop
    assert streams.sent > 500
    assert streams.tcp_bytes == streams.sent * 100
    assert retransmits(topology, topology.a) == retrans_before

    second_progs = topology.run(topology.node, lambda: attached_prog_ids(link))
    assert None not in second_progs
    assert set(second_progs).isdisjoint(first_progs)  # replaced in place by the new instance
    with PinnedMaps(pin_dir) as maps:
        assert {
            m.name: m.id for m in (maps.auth._map.info, maps.ipcache._map.info, maps.policy._map.info)
        } == map_ids
        assert maps.auth.get(AuthKey(B, A, 0)) is not None
        counters = maps.counters.read()
        assert counters["denied_auth_required"] == counters["denied_auth_expired"] == 0
    authd.stop()
    assert '"reused_pins": true' in authd.outputs[1]
