"""The wire between two sockets in a guest test: a TCP forwarder that keeps every byte it carries."""

from __future__ import annotations

import contextlib
import socket
import threading


class WireTap:
    """Forwards one TCP connection to ``target`` both ways, keeping what passed in each direction."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.target = target
        self.wire: dict[str, bytearray] = {"to-server": bytearray(), "to-client": bytearray()}
        self._threads: list[threading.Thread] = []
        self._sockets: list[socket.socket] = []
        accept = threading.Thread(target=self._accept)
        accept.start()
        self._threads.append(accept)

    def _accept(self) -> None:
        inbound, _ = self.listener.accept()
        outbound = socket.create_connection(self.target, timeout=10)
        self._sockets += [inbound, outbound]
        for source, sink, name in ((inbound, outbound, "to-server"), (outbound, inbound, "to-client")):
            thread = threading.Thread(target=self._pump, args=(source, sink, self.wire[name]))
            thread.start()
            self._threads.append(thread)

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket, kept: bytearray) -> None:
        try:
            while chunk := source.recv(65536):
                kept += chunk
                sink.sendall(chunk)
            sink.shutdown(socket.SHUT_WR)
        except OSError:  # one end went away (reset): the wire ends for the other too
            with contextlib.suppress(OSError):
                sink.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        """End both connections (shut down first: a close alone would not wake the pumps' reads)."""
        self.listener.close()
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        for thread in self._threads:
            thread.join(10)


def records(stream: bytes) -> list[tuple[int, int]]:
    """(content type, length) of each TLS record of ``stream``, which must be whole records only."""
    found = []
    offset = 0
    while offset < len(stream):
        header = stream[offset : offset + 5]
        length = int.from_bytes(header[3:5], "big")
        assert header[0] in (20, 21, 22, 23), header.hex()
        assert header[1:3] in (b"\x03\x01", b"\x03\x03"), header.hex()
        found.append((header[0], length))
        offset += 5 + length
    assert offset == len(stream), "the stream ends inside a record"
    return found
