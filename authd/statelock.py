"""One daemon per state directory: an exclusive ``flock`` on ``<state_dir>/authd.lock``, held while it runs.

A second ``authd run`` with the same state directory fails here, before it touches anything the first one
owns (its control socket, its handle state, its pins). The kernel drops the lock when the holder exits,
however it exits, so a crash never leaves a stale lock behind. The file holds the holder's pid, for the
message.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from authd.errors import DaemonError

LOCK_FILE = "authd.lock"


class StateLock:
    """The held lock on one state directory."""

    def __init__(self, state_dir: Path) -> None:
        """Create ``state_dir`` (owner-only) if missing and take its lock, or raise DaemonError."""
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.path = state_dir / LOCK_FILE
        try:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as err:
            raise DaemonError(f"daemon: cannot open {self.path}: {err.strerror}") from err
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as err:
            holder = os.pread(self._fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(self._fd)
            raise DaemonError(
                f"daemon: another authd (pid {holder}) already runs with state directory {state_dir}; "
                "stop it first (systemctl stop authd), or give this one its own node.state_dir"
            ) from err
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        """Give the lock up (idempotent); the file stays, as every holder rewrites it."""
        with contextlib.suppress(OSError):
            os.close(self._fd)
        self._fd = -1
