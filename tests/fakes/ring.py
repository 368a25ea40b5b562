"""A hand-written ring buffer for the event consumer: records queued in memory, a pipe as the fd."""

from __future__ import annotations

import os


class FakeRing:
    def __init__(self, records: list[bytes] | None = None) -> None:
        self.records = list(records or [])
        self._read_fd, self._write_fd = os.pipe()

    def push(self, *records: bytes) -> None:
        self.records.extend(records)
        os.write(self._write_fd, b"x")

    def read(self, limit: int = 4096) -> list[bytes]:
        taken, self.records = self.records[:limit], self.records[limit:]
        if not self.records:
            try:
                os.set_blocking(self._read_fd, False)
                while os.read(self._read_fd, 4096):
                    pass
            except BlockingIOError:
                pass
        return taken

    def drain(self) -> int:
        return len(self.read(len(self.records) or 1))

    def fileno(self) -> int:
        return self._read_fd

    def close(self) -> None:
        os.close(self._read_fd)
        os.close(self._write_fd)
