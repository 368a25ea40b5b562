"""A steady, sequence-numbered UDP flow to an echo server: datagrams sent, and those never echoed back.

Unlike the cluster harness's ``udp-flow`` (a fixed count), it runs for exactly as long as its ``with``
block, so the events it watches over (rotations) may take as long as they take.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from types import TracebackType
from typing import Self

_SEQ = struct.Struct("!Q")
_RECV_TIMEOUT = 0.05


class UdpFlow:
    """Datagrams numbered from 0 sent from ``sock`` to ``to``, ``rate`` a second, while the block runs.

    ``sock`` is a UDP socket made in the namespace the flow leaves from; the flow closes it. When the
    block ends, sending stops and echoes are awaited for up to ``linger`` seconds more; then ``sent``
    and ``lost`` (sent, and not echoed in that time: lost on the way there or back) are final.
    """

    def __init__(self, sock: socket.socket, to: tuple[str, int], rate: float, *, linger: float = 0.5) -> None:
        """Send to ``to`` from ``sock``, ``rate`` datagrams a second, once entered."""
        self.sent = 0
        self._sock = sock
        self._to = to
        self._interval = 1 / rate
        self._linger = linger
        self._echoed: set[int] = set()
        self._sending = threading.Event()
        self._receiving = threading.Event()
        self._threads = [
            threading.Thread(target=self._send, name="udpflow-send"),
            threading.Thread(target=self._receive, name="udpflow-receive"),
        ]

    @property
    def lost(self) -> int:
        """Datagrams sent whose echo has not come back."""
        return self.sent - len(self._echoed)

    def __enter__(self) -> Self:
        """Start sending and receiving."""
        self._sock.settimeout(_RECV_TIMEOUT)
        self._sending.set()
        self._receiving.set()
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        """Stop sending, wait up to ``linger`` for the last echoes, stop receiving, close the socket."""
        self._sending.clear()
        self._threads[0].join()
        deadline = time.monotonic() + self._linger
        while self.lost and time.monotonic() < deadline:
            time.sleep(0.01)
        self._receiving.clear()
        self._threads[1].join()
        self._sock.close()

    def _send(self) -> None:
        started = time.monotonic()
        while self._sending.is_set():
            with contextlib.suppress(OSError):  # refused on the way out: it counts as sent, and lost
                self._sock.sendto(_SEQ.pack(self.sent), self._to)
            self.sent += 1
            delay = started + self.sent * self._interval - time.monotonic()  # paced on the start: no drift
            if delay > 0:
                time.sleep(delay)

    def _receive(self) -> None:
        while self._receiving.is_set():
            try:
                data = self._sock.recv(2048)
            except TimeoutError:
                continue
            if len(data) == _SEQ.size:
                self._echoed.add(_SEQ.unpack(data)[0])
