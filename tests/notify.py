"""A stand-in for systemd's NOTIFY_SOCKET: tests wait on what ``authd run`` tells systemd."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest


class NotifyReceiver:
    """A bound datagram socket that keeps every message it received."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.messages: list[str] = []

    def wait_for(self, line: str, timeout: float) -> float:
        """Return the time at which a message containing ``line`` arrived; fail the test after ``timeout``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(line in m.splitlines() for m in self.messages):
                return time.monotonic()
            self.sock.settimeout(max(deadline - time.monotonic(), 0.01))
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except TimeoutError:
                break
        pytest.fail(f"no {line!r} within {timeout}s; got {self.messages}")

    def close(self) -> None:
        self.sock.close()
