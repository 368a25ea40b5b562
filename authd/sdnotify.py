"""systemd notifications (sd_notify) over ``$NOTIFY_SOCKET``: READY, STATUS, STOPPING, WATCHDOG.

Without ``NOTIFY_SOCKET`` every call is a no-op, so the daemon runs the same under systemd and elsewhere.

Sends happen on the event loop, so they never block: the socket is non-blocking, and a message the
receiver has no room for (nobody reads the socket, or systemd is slow) is dropped and counted. Every
message carries the whole current state (READY and STATUS), so the next one that gets through corrects
what systemd missed.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

import structlog

log = structlog.get_logger(__name__)

_LOG_EVERY = 100


class Notifier:
    """Sends state lines to systemd's notification socket, if one is set."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        """Read ``NOTIFY_SOCKET`` and the watchdog settings from the environment."""
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        # An address starting with "@" names a socket in the abstract namespace.
        self._address = "\0" + address[1:] if address.startswith("@") else address
        self.watchdog_interval = _watchdog_interval(env)
        self.dropped = 0
        """Messages not delivered because the receiver's queue was full or the socket unreachable."""

    @property
    def enabled(self) -> bool:
        """Whether a notification socket is configured."""
        return bool(self._address)

    def ready(self, status: str) -> None:
        """Tell systemd start-up is complete."""
        self._send(f"READY=1\nSTATUS={status}")

    def status(self, status: str) -> None:
        """Update the one-line status shown by ``systemctl status``."""
        self._send(f"STATUS={status}")

    def reloading(self) -> None:
        """Tell systemd a configuration reload started."""
        self._send("RELOADING=1")

    def reloaded(self, status: str) -> None:
        """Tell systemd the reload finished."""
        self._send(f"READY=1\nSTATUS={status}")

    def stopping(self) -> None:
        """Tell systemd shutdown started."""
        self._send("STOPPING=1\nSTATUS=stopping")

    def watchdog(self) -> None:
        """Keep the watchdog from firing."""
        self._send("WATCHDOG=1")

    def _send(self, message: str) -> None:
        if not self._address:
            return
        flags = socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
        with socket.socket(socket.AF_UNIX, flags) as sock:
            try:
                sock.sendto(message.encode(), self._address)
            except OSError as err:
                # Full (nobody reads), or systemd gone: the service keeps running, and the next message
                # that gets through carries the current state. Logged on the first drop, then every 100th.
                self.dropped += 1
                if self.dropped % _LOG_EVERY == 1:
                    log.warning("sd_notify message dropped", error=str(err), dropped=self.dropped)


def _watchdog_interval(env: Mapping[str, str]) -> float | None:
    """Seconds between WATCHDOG=1 pings (half the timeout), or None when no watchdog is armed for us."""
    usec = env.get("WATCHDOG_USEC")
    pid = env.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 2_000_000
    except ValueError:
        return None
