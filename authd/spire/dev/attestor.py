"""Workload attestation like SPIRE's ``unix`` attestor: selectors from a caller's process credentials.

The caller of a Unix-socket API is identified by the kernel (``SO_PEERCRED``: pid, uid, gid at connect
time); its supplementary groups come from ``/proc/<pid>/status``. Selectors, as SPIRE emits them:
``unix:uid:<n>``, ``unix:user:<name>``, ``unix:gid:<n>``, ``unix:group:<name>``,
``unix:supplementary_gid:<n>``, ``unix:supplementary_group:<name>`` (names only when they resolve).
"""

from __future__ import annotations

import grp
import pwd
import socket
import struct
from dataclasses import dataclass
from pathlib import Path

from authd.errors import SpireError
from authd.identity import Selector

_PEERCRED = struct.Struct("3i")


class AttestationError(SpireError):
    """The caller could not be attested (SPIRE answers ``UNAVAILABLE "workload attestation failed"``)."""

    def __init__(self, detail: str) -> None:
        """Say why; a later attempt may succeed."""
        super().__init__(f"dev-spire: workload attestation failed: {detail}", retryable=True)


@dataclass(frozen=True, slots=True)
class Caller:
    """A process on the other end of a socket, and its selectors."""

    pid: int
    uid: int
    gid: int
    selectors: frozenset[Selector]


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process that connected ``sock``."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    pid, uid, gid = _PEERCRED.unpack(raw)
    return pid, uid, gid


def attest_socket(sock: socket.socket | None, proc: Path = Path("/proc")) -> Caller:
    """Attest the peer of a connected Unix socket."""
    if sock is None or sock.family != socket.AF_UNIX:
        raise AttestationError("not a Unix socket peer")
    pid, uid, gid = peer_credentials(sock)
    return Caller(pid, uid, gid, selectors_for(pid, uid, gid, proc))


def attest_pid(pid: int, proc: Path = Path("/proc")) -> Caller:
    """Attest a process by PID (the Delegated Identity API's ``pid`` form), from its real uid and gid."""
    status = _status(pid, proc)
    try:
        uid = int(status["Uid"].split()[0])
        gid = int(status["Gid"].split()[0])
    except (KeyError, IndexError, ValueError) as err:
        raise AttestationError(f"pid {pid}: unreadable credentials") from err
    return Caller(pid, uid, gid, selectors_for(pid, uid, gid, proc))


def selectors_for(pid: int, uid: int, gid: int, proc: Path = Path("/proc")) -> frozenset[Selector]:
    """The ``unix`` selectors of a process with these credentials."""
    selectors = {Selector("unix", f"uid:{uid}"), Selector("unix", f"gid:{gid}")}
    user = _user_name(uid)
    if user is not None:
        selectors.add(Selector("unix", f"user:{user}"))
    group = _group_name(gid)
    if group is not None:
        selectors.add(Selector("unix", f"group:{group}"))
    groups = _status(pid, proc).get("Groups", "")
    for text in groups.split():
        supplementary = int(text)
        selectors.add(Selector("unix", f"supplementary_gid:{supplementary}"))
        name = _group_name(supplementary)
        if name is not None:
            selectors.add(Selector("unix", f"supplementary_group:{name}"))
    return frozenset(selectors)


def _status(pid: int, proc: Path) -> dict[str, str]:
    try:
        text = (proc / str(pid) / "status").read_text(encoding="utf-8")
    except OSError as err:
        raise AttestationError(f"pid {pid}: {err}") from err
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def _user_name(uid: int) -> str | None:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return None


def _group_name(gid: int) -> str | None:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return None
