"""authd.journal: records reach a journald-shaped socket with their priority and fields, never blocking."""

from __future__ import annotations

import logging
import os
import socket
import struct
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from authd import log
from authd.journal import JournalWriter, encode, stderr_is_journal


def parse(datagram: bytes) -> dict[str, str]:
    """journald's side of the native protocol."""
    fields: dict[str, str] = {}
    rest = datagram
    while rest:
        line, _, rest = rest.partition(b"\n")
        if b"=" in line:
            name, _, value = line.partition(b"=")
            fields[name.decode()] = value.decode()
        else:
            (size,) = struct.unpack("<Q", rest[:8])
            fields[line.decode()] = rest[8 : 8 + size].decode()
            rest = rest[8 + size + 1 :]
    return fields


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "socket"))
    sock.settimeout(2)
    yield sock
    sock.close()


def test_each_record_carries_its_priority_and_fields(tmp_path: Path, journal: socket.socket) -> None:
    writer = JournalWriter(tmp_path / "socket")
    writer.send({"event": "peer attest failed", "level": "warning", "peer": "node-b", "retry_in_s": 2})
    writer.send({"event": "authd ready", "level": "info"})
    warning, info = parse(journal.recv(65536)), parse(journal.recv(65536))
    writer.close()
    assert warning["PRIORITY"] == "4"
    assert warning["MESSAGE"] == "peer attest failed peer=node-b retry_in_s=2"
    assert warning["AUTHD_PEER"] == "node-b"
    assert warning["AUTHD_RETRY_IN_S"] == "2"
    assert warning["SYSLOG_IDENTIFIER"] == "authd"
    assert info["PRIORITY"] == "6"


def test_a_multi_line_value_is_length_prefixed() -> None:
    fields = {"MESSAGE": "boom\nTraceback", "PRIORITY": "3"}
    assert parse(encode(fields)) == fields


def test_a_full_journal_drops_and_counts_instead_of_blocking(tmp_path: Path, journal: socket.socket) -> None:
    writer = JournalWriter(tmp_path / "socket")
    sent = 0
    while writer.dropped == 0:  # nobody reads: the socket's queue fills and send would block
        writer.send({"event": "x" * 1000, "level": "info"})
        sent += 1
        assert sent < 100_000
    writer.send({"event": "more", "level": "info"})
    assert writer.dropped == 2
    journal.settimeout(0)
    while True:  # drain, then the next record says how many were lost
        try:
            journal.recv(65536)
        except BlockingIOError:
            break
    journal.settimeout(2)
    writer.send({"event": "after", "level": "error"})
    last = parse(journal.recv(65536))
    writer.close()
    assert last["AUTHD_JOURNAL_DROPPED"] == "2"
    assert last["PRIORITY"] == "3"


def test_journal_stream_must_name_stderr() -> None:
    stat = os.fstat(sys.stderr.fileno())
    assert stderr_is_journal({"JOURNAL_STREAM": f"{stat.st_dev}:{stat.st_ino}"})
    assert not stderr_is_journal({"JOURNAL_STREAM": f"{stat.st_dev}:{stat.st_ino + 1}"})
    assert not stderr_is_journal({"JOURNAL_STREAM": "garbage"})
    assert not stderr_is_journal({})


def test_configure_routes_structlog_and_stdlib_to_the_journal(
    tmp_path: Path, journal: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    stat = os.fstat(sys.stderr.fileno())
    monkeypatch.setenv("JOURNAL_STREAM", f"{stat.st_dev}:{stat.st_ino}")
    monkeypatch.setattr("authd.log.JournalWriter", lambda: JournalWriter(tmp_path / "socket"))
    saved, root = structlog.get_config(), logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        log.configure("info")
        structlog.get_logger("t").error("listener failed", port=4250)
        logging.getLogger("grpc").warning("channel %s lost", "x")
        first, second = parse(journal.recv(65536)), parse(journal.recv(65536))
    finally:
        structlog.configure(**saved)  # process-wide: later tests capture what the defaults print
        log.configure("info", "console")  # closes the journal's handler and its socket
        structlog.configure(**saved)
        root.handlers[:] = handlers
        root.setLevel(level)
    assert (first["PRIORITY"], first["AUTHD_PORT"]) == ("3", "4250")
    assert (second["PRIORITY"], second["AUTHD_LOGGER"]) == ("4", "grpc")
    assert second["MESSAGE"].startswith("channel x lost")
