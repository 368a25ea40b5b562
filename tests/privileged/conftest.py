"""Fixtures for tests that load the real BPF object: unique pin dirs and namespaces, always cleaned up."""

from __future__ import annotations

import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from authd.datapath.layout import FlowLevel
from authd.datapath.loader import Datapath, MapSizes, remove_pins
from authd.datapath.maps import PinnedMaps, RuntimeConfig
from authd.datapath.ringbuf import RingBuffer
from tests.privileged.daemon import Authd
from tests.privileged.topology import Topology

SIZES = MapSizes(ipcache=1024, policy=1024, auth=4096, events_bytes=1 << 20, flows=4096)


@pytest.fixture
def pin_dir() -> Iterator[Path]:
    path = Path(f"/sys/fs/bpf/adp-{secrets.token_hex(4)}")
    try:
        yield path
    finally:
        remove_pins(path)
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def datapath(pin_dir: Path) -> Iterator[Datapath]:
    loaded = Datapath.load(pin_dir, SIZES)
    try:
        loaded.configure(RuntimeConfig(FlowLevel.FIRST, 1_000_000_000))
        yield loaded
    finally:
        loaded.close()


@pytest.fixture
def maps(datapath: Datapath) -> Iterator[PinnedMaps]:
    with datapath.maps() as opened:
        yield opened


@pytest.fixture
def ring(datapath: Datapath) -> Iterator[RingBuffer]:
    reader = RingBuffer(datapath.events_fd())
    try:
        reader.drain()
        yield reader
    finally:
        reader.close()


@pytest.fixture
def auth_ring(datapath: Datapath) -> Iterator[RingBuffer]:
    reader = RingBuffer(datapath.auth_events_fd())
    try:
        reader.drain()
        yield reader
    finally:
        reader.close()


@pytest.fixture
def topology() -> Iterator[Topology]:
    topo = Topology()
    try:
        yield topo
    finally:
        topo.close()


@pytest.fixture
def authd(topology: Topology, tmp_path: Path, pin_dir: Path) -> Iterator[Authd]:
    daemon = Authd(topology, tmp_path, pin_dir)
    try:
        yield daemon
    finally:
        daemon.close()
