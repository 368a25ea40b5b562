"""journald's native protocol: each record as one datagram with its priority and its fields.

Under systemd, stdout and stderr are a stream into the journal, which gives every line the unit's default
priority (6, info), so ``journalctl -p warning`` would find none of authd's warnings. When stderr is that
stream (``$JOURNAL_STREAM`` names its device and inode), authd sends records to journald's socket instead:
``PRIORITY`` from the level, ``MESSAGE`` the event text with its fields, and each field as a journal field
of its own (``AUTHD_PEER=...``), so ``journalctl -o json`` shows them.

The socket is non-blocking: when journald is slow and its queue is full, the record is dropped and counted
rather than stalling the event loop, and the next record that gets through says how many were lost.
"""

from __future__ import annotations

import os
import re
import socket
import struct
import sys
from collections.abc import Mapping, MutableMapping
from pathlib import Path
from typing import Any

SOCKET = Path("/run/systemd/journal/socket")
IDENTIFIER = "authd"
MAX_VALUE = 16 * 1024
"""Longer field values (a huge traceback) are cut: a datagram must stay well below the socket's buffer."""

PRIORITIES = {"debug": 7, "info": 6, "warning": 4, "error": 3, "exception": 3, "critical": 2}
_NOT_FIELDS = frozenset({"event", "level", "timestamp", "_record", "_from_structlog"})
_FIELD_CHARS = re.compile(r"[^A-Z0-9_]")


def stderr_is_journal(environ: Mapping[str, str] | None = None) -> bool:
    """Whether ``$JOURNAL_STREAM`` ("DEVICE:INODE") names the stream that stderr is."""
    value = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    device, _, inode = value.partition(":")
    try:
        stat = os.fstat(sys.stderr.fileno())
        return (int(device), int(inode)) == (stat.st_dev, stat.st_ino)
    except (ValueError, OSError):  # ValueError: not "N:N", or stderr has no file descriptor
        return False


def field_name(key: str) -> str:
    """The journal field for an event key: upper case, ``[A-Z0-9_]`` only, prefixed ``AUTHD_``."""
    return "AUTHD_" + _FIELD_CHARS.sub("_", key.upper())[:57]


def encode(fields: Mapping[str, str]) -> bytes:
    """One datagram of the native protocol: ``NAME=value`` lines; values with a newline length-prefixed."""
    parts = []
    for name, value in fields.items():
        data = value.encode(errors="replace")
        if b"\n" in data:
            parts.append(name.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n")
        else:
            parts.append(name.encode() + b"=" + data + b"\n")
    return b"".join(parts)


def record_fields(event_dict: Mapping[str, Any]) -> dict[str, str]:
    """The journal fields of one structlog event (after ``format_exc_info``)."""
    level = str(event_dict.get("level", "info")).lower()
    extra = {key: value for key, value in event_dict.items() if key not in _NOT_FIELDS}
    exception = extra.pop("exception", None)
    text = " ".join([str(event_dict.get("event", "")), *(f"{key}={value}" for key, value in extra.items())])
    fields = {
        "MESSAGE": _cut(text if exception is None else f"{text}\n{exception}"),
        "PRIORITY": str(PRIORITIES.get(level, 6)),
        "SYSLOG_IDENTIFIER": IDENTIFIER,
    }
    fields.update({field_name(key): _cut(str(value)) for key, value in extra.items()})
    return fields


class JournalWriter:
    """Sends structlog events to journald; a structlog logger (``msg``) and the stdlib handler's sink."""

    def __init__(self, path: Path = SOCKET) -> None:
        """Connect to journald's socket at ``path`` (a datagram socket, non-blocking)."""
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._sock.setblocking(False)  # noqa: FBT003 - the socket API's own positional flag
        self._sock.connect(str(path))
        self.dropped = 0

    def send(self, event_dict: Mapping[str, Any]) -> None:
        """Send one event; drop it (counted) if journald cannot take it now."""
        fields = record_fields(event_dict)
        if self.dropped:
            fields["AUTHD_JOURNAL_DROPPED"] = str(self.dropped)
        try:
            self._sock.send(encode(fields))
        except OSError:  # EAGAIN (journald behind), ECONNREFUSED (restarting), EMSGSIZE: never block
            self.dropped += 1
        else:
            self.dropped = 0

    def msg(self, event_dict: Mapping[str, Any]) -> None:
        """Log ``event_dict``: structlog's logger method, to which the final processor hands the event."""
        self.send(event_dict)

    debug = info = warning = error = critical = exception = msg

    def close(self) -> None:
        """Close the socket."""
        self._sock.close()


def journal_record(
    logger: object, method_name: str, event_dict: MutableMapping[str, Any]
) -> tuple[tuple[Mapping[str, Any]], dict[str, Any]]:
    """The final processor for :class:`JournalWriter`: pass the event itself as the one argument."""
    del logger, method_name
    return (event_dict,), {}


def _cut(value: str) -> str:
    return value if len(value) <= MAX_VALUE else value[: MAX_VALUE - 3] + "..."
