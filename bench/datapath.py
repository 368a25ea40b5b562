"""Datapath costs, each against a baseline measured in the same run.

Per-packet program time against an empty program (BPF_PROG_TEST_RUN), TCP throughput with the programs
attached against none (iperf3 over veth), map writes single and batched, ring-buffer events into Python.

Needs root (BPF, network namespaces); prints a note and returns nothing otherwise.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import threading
import time
from datetime import UTC, datetime, timedelta
from ipaddress import ip_network
from pathlib import Path

from authd import log
from authd.datapath import clock, syscalls
from authd.datapath.events import decode
from authd.datapath.layout import ENDPOINT_F_ROUTE, AuthType, Direction, FlowLevel, ProgramName
from authd.datapath.loader import Datapath, MapSizes, remove_pins
from authd.datapath.maps import AuthKey, EndpointOwner, IpcacheEntry, PinnedMaps, PolicyKey, RuntimeConfig
from authd.datapath.ringbuf import RingBuffer
from bench import iperf
from bench.figures import Figures, figure, median
from tests.fakes import packets as pk
from tests.privileged.topology import A4, B4, Topology

A, B = 300, 400
SIZES = MapSizes(ipcache=1024, policy=1024, auth=65536, events_bytes=4 << 20, flows=4096)
TEST_RUN_REPEAT = 1_000_000
ROUNDS = 5
MAP_ENTRIES = 20_000
EVENTS_SECONDS = 2.0


def run() -> Figures:
    """Measure everything in one loaded datapath with its own pins."""
    if os.geteuid() != 0:
        print("bench: datapath needs root; skipped")
        return {}
    log.configure("warning", "console")  # keep libbpf's notes out of the figures
    pin_dir = Path(f"/sys/fs/bpf/adp-bench-{secrets.token_hex(3)}")
    datapath = Datapath.load(pin_dir, SIZES)
    try:
        datapath.configure(RuntimeConfig(FlowLevel.FIRST, 1_000_000_000))
        with datapath.maps() as maps:
            _populate(maps)
            figures = _per_packet(datapath)
            figures.update(_map_updates(maps))
            figures.update(_events(datapath))
            datapath.configure(RuntimeConfig(FlowLevel.FIRST, 1_000_000_000))
            figures.update(_iperf(datapath))
        return figures
    finally:
        datapath.close()
        remove_pins(pin_dir)
        shutil.rmtree(pin_dir, ignore_errors=True)


def _populate(maps: PinnedMaps) -> None:
    """A and B local, B behind the test run's interface; B requires authentication from A, which it has.

    That is the full pass path.
    """
    maps.endpoints.update_many({ip_network(f"{B4}/32"): EndpointOwner(1, ENDPOINT_F_ROUTE)})
    maps.ipcache.update_many(
        {ip_network(f"{A4}/32"): IpcacheEntry(A, 0), ip_network(f"{B4}/32"): IpcacheEntry(B, 0)}
    )
    maps.policy.update_many({PolicyKey(B, A, Direction.INGRESS): AuthType.SPIRE})
    maps.auth.update_many({AuthKey(B, A, 0): datetime.now(UTC) + timedelta(hours=1)})


def _per_packet(datapath: Datapath) -> Figures:
    """Per-packet cost against an empty program in the same run.

    A connection's first packet (a SYN: always judged in full, its flow entry written) and a packet of an
    established flow (an ACK: the flow table alone).
    """
    first = pk.tcp_frame(A4, B4, 40000, 5201, pk.SYN)
    established = pk.tcp_frame(A4, B4, 40000, 5201, pk.ACK)
    empty = syscalls.prog_load_trivial(-1)
    program = datapath.prog_fd(ProgramName.EGRESS)  # at B's veth: INGRESS for B, policy + auth lookups
    try:
        assert syscalls.prog_test_run(program, first).retval == -1, "bench: the pass path did not pass"
        firsts: list[float] = []
        establisheds: list[float] = []
        empties: list[float] = []
        for _ in range(ROUNDS):
            firsts.append(syscalls.prog_test_run(program, first, repeat=TEST_RUN_REPEAT).duration_ns)
            establisheds.append(
                syscalls.prog_test_run(program, established, repeat=TEST_RUN_REPEAT).duration_ns
            )
            empties.append(syscalls.prog_test_run(empty, first, repeat=TEST_RUN_REPEAT).duration_ns)
    finally:
        os.close(empty)
    return {
        "datapath.pass_ns": figure(median(firsts), "ns"),
        "datapath.pass_established_ns": figure(median(establisheds), "ns"),
        "datapath.empty_prog_ns": figure(median(empties), "ns"),
    }


def _map_updates(maps: PinnedMaps) -> Figures:
    expires = datetime.now(UTC) + timedelta(hours=1)
    single, batch = [], []
    for round_ in range(3):
        keys = [AuthKey(1000 + round_, remote, 1) for remote in range(MAP_ENTRIES)]
        started = time.perf_counter()
        for key in keys:
            maps.auth.update(key, expires)
        single.append((time.perf_counter() - started) / MAP_ENTRIES)
        maps.auth.delete_many(keys)
        started = time.perf_counter()
        maps.auth.update_many(dict.fromkeys(keys, expires))
        batch.append((time.perf_counter() - started) / MAP_ENTRIES)
        maps.auth.delete_many(keys)
    return {
        "datapath.map_update_us": figure(median(single) * 1e6, "us"),
        "datapath.map_update_batch_us": figure(median(batch) * 1e6, "us"),
    }


def _events(datapath: Datapath) -> Figures:
    """Flow events at level "all" from a producer thread running the program, decoded in this thread."""
    datapath.configure(RuntimeConfig(FlowLevel.ALL, 1_000_000_000))
    frame = pk.tcp_frame(A4, B4, 40000, 5201, pk.ACK)
    program = datapath.prog_fd(ProgramName.EGRESS)
    ring = RingBuffer(datapath.events_fd())
    stop = threading.Event()

    def produce() -> None:
        while not stop.is_set():
            syscalls.prog_test_run(program, frame, repeat=20_000)

    ring.drain()
    producer = threading.Thread(target=produce, daemon=True)
    producer.start()
    decoded = 0
    try:
        started = time.perf_counter()
        while time.perf_counter() - started < EVENTS_SECONDS:
            offset = clock.tai_offset_ns()
            for record in ring.read(4096):
                decode(record, offset)
                decoded += 1
        elapsed = time.perf_counter() - started
    finally:
        stop.set()
        producer.join()
        ring.drain()
        ring.close()
    return {"datapath.events_per_s": figure(decoded / elapsed, "events/s")}


def _iperf(datapath: Datapath) -> Figures:
    """TCP throughput A -> B through the node, alternating without and with the programs attached."""
    topo = Topology()
    links = (topo.link_a, topo.link_b)
    try:
        with datapath.maps() as maps:
            topo.learn_ownership(maps.endpoints)  # which veth owns A and B, from the node's routes
        with iperf.server(topo.path(topo.b), B4):
            without, with_programs = [], []
            for _ in range(2):
                without.append(iperf.throughput(topo.path(topo.a), B4))
                topo.run(
                    topo.node,
                    lambda: [datapath.attach(socket.if_nametoindex(link), l3=False) for link in links],
                )
                with_programs.append(iperf.throughput(topo.path(topo.a), B4))
                topo.run(topo.node, lambda: [datapath.detach(socket.if_nametoindex(link)) for link in links])
    finally:
        topo.close()
    return {
        "datapath.iperf_ratio": figure(median(with_programs) / median(without), "ratio"),
        "datapath.iperf_without_gbps": figure(median(without) / 1e9, "Gbit/s"),
    }
