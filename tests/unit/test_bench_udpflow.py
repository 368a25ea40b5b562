"""The bench's UDP flow (bench/udpflow.py) against an echo server on loopback that may drop some datagrams."""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Callable, Iterator

import pytest

from bench.udpflow import UdpFlow

ENOUGH = 50


class Echo:
    """Echoes every datagram whose sequence number ``keep`` accepts; counts what it saw."""

    def __init__(self, keep: Callable[[int], bool]) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.05)
        self.keep = keep
        self.seen = 0
        self.enough = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve)
        self._thread.start()

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.sock.getsockname()
        return str(host), int(port)

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data, peer = self.sock.recvfrom(2048)
            except TimeoutError:
                continue
            self.seen += 1
            if self.seen >= ENOUGH:
                self.enough.set()
            if self.keep(struct.unpack("!Q", data)[0]):
                self.sock.sendto(data, peer)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


@pytest.fixture
def echo_all() -> Iterator[Echo]:
    echo = Echo(lambda _: True)
    yield echo
    echo.close()


@pytest.fixture
def echo_four_in_five() -> Iterator[Echo]:
    echo = Echo(lambda seq: seq % 5 != 0)
    yield echo
    echo.close()


def flow_until_enough(echo: Echo, linger: float) -> UdpFlow:
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with UdpFlow(sender, echo.address, rate=2000, linger=linger) as flow:
        assert echo.enough.wait(5)
    return flow


def test_every_echo_back_is_no_loss(echo_all: Echo) -> None:
    flow = flow_until_enough(echo_all, linger=2.0)
    assert flow.sent >= ENOUGH
    assert flow.lost == 0


def test_each_datagram_without_an_echo_counts_as_lost(echo_four_in_five: Echo) -> None:
    flow = flow_until_enough(echo_four_in_five, linger=0.2)
    assert flow.sent >= ENOUGH
    assert flow.lost == len(range(0, flow.sent, 5))
