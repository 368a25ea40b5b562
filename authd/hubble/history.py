"""Recent flows on disk, so that ``GetFlows`` with ``since`` still answers after a restart.

Two segment files in one directory (``<state_dir>/flows/``): ``current`` and ``previous``, each at most
half of the configured bytes. A flow is appended to ``current`` as one record, a little-endian 4-byte
length then the serialized ``flow.Flow``, in a single ``write`` on an append-only descriptor: a killed
daemon loses none that were written. When ``current`` would outgrow its half it becomes ``previous``
(the older one is dropped) and a new ``current`` starts, so the directory never holds more than the
configured bytes and always the most recent flows. On start both are read back, oldest first, and
writing goes on in ``current`` after its last good record.

Reading fails closed: a segment that does not start with authd's header is skipped whole, and a record
that does not decode (the torn tail a crash mid-write leaves, bytes that are not a flow) ends that
segment's reading; what came before it is kept, the rest is counted as ``discarded``. Writing is
best-effort: a flow that cannot be written (disk full) is counted and the daemon goes on.
"""

from __future__ import annotations

import contextlib
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import structlog
from google.protobuf.message import DecodeError

from authd.hubble._proto import flow_pb2

log = structlog.get_logger(__name__)

HISTORY_DIR = "flows"  # under node.state_dir
HEADER = b"authd-flows-1\n"
LENGTH = struct.Struct("<I")
CURRENT = "current"
PREVIOUS = "previous"


class FlowHistory:
    """The on-disk ring of recent flows in ``directory``, at most ``max_bytes`` in all."""

    def __init__(self, directory: Path, max_bytes: int) -> None:
        """Keep flows in ``directory`` (made owner-only at the first write); ``max_bytes`` as validated."""
        self.directory = directory
        self.segment_bytes = max_bytes // 2
        self.discarded = 0
        self.write_errors = 0
        self._fd: int | None = None
        self._size = 0
        self._resume: int | None = None

    def load(self) -> list[flow_pb2.Flow]:
        """The kept flows, oldest first; the next :meth:`append` continues ``current`` after them."""
        return [flow for name in (PREVIOUS, CURRENT) for flow in self._read(self.directory / name)]

    def _read(self, path: Path) -> Iterator[flow_pb2.Flow]:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return
        except OSError as err:
            log.warning("flow history unreadable", path=str(path), error=str(err))
            return
        if not data.startswith(HEADER):
            log.warning("flow history segment skipped: not authd's", path=str(path))
            self.discarded += 1
            return
        offset = len(HEADER)
        while offset < len(data):
            record = _record(data, offset)
            if record is None:
                log.warning("flow history segment ends in a bad record", path=str(path), offset=offset)
                self.discarded += 1
                break
            flow, offset = record
            yield flow
        if path.name == CURRENT:
            self._resume = offset  # where its last good record ends

    def append(self, flow: flow_pb2.Flow) -> None:
        """Write one flow; a failure is counted and logged, never raised."""
        body = flow.SerializeToString()
        record = LENGTH.pack(len(body)) + body
        try:
            if self._fd is None:
                self._open()
            if self._size + len(record) > self.segment_bytes:
                self._rotate()
            assert self._fd is not None  # opened by _open or _rotate
            os.write(self._fd, record)
        except OSError as err:
            self.write_errors += 1
            if self.write_errors == 1 or self.write_errors % 1000 == 0:
                log.warning("flow history write failed", error=str(err), failures=self.write_errors)
            self.close()  # the next flow starts a fresh segment
            return
        self._size += len(record)

    def _open(self) -> None:
        """Continue the ``current`` that :meth:`load` read (cut after its last good record), or rotate."""
        resume, self._resume = self._resume, None
        if resume is None:
            self._rotate()
            return
        fd = os.open(self.directory / CURRENT, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        try:
            os.ftruncate(fd, resume)
        except OSError:
            os.close(fd)
            raise
        self._fd, self._size = fd, resume

    def _rotate(self) -> None:
        """Start a new ``current``; the one in use (or left by the last run) becomes ``previous``."""
        self.close()
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        current = self.directory / CURRENT
        with contextlib.suppress(FileNotFoundError):
            current.replace(self.directory / PREVIOUS)
        fd = os.open(current, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, HEADER)
        except OSError:
            os.close(fd)
            raise
        self._fd, self._size = fd, len(HEADER)

    def close(self) -> None:
        """Close the open segment (the files stay)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _record(data: bytes, offset: int) -> tuple[flow_pb2.Flow, int] | None:
    """The flow at ``offset`` and where the next record starts, or None if it does not decode."""
    start = offset + LENGTH.size
    if start > len(data):
        return None
    (length,) = LENGTH.unpack_from(data, offset)
    end = start + length
    if end > len(data):
        return None
    flow = flow_pb2.Flow()
    try:
        flow.ParseFromString(data[start:end])
    except DecodeError:
        return None
    if not flow.HasField("time"):  # every flow authd writes has one; since/until need it
        return None
    return flow, end
