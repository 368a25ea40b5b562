"""tcx through the raw bpf(2) syscall: links placed before every other program, updated, queried, detached.

Debian 12's libbpf (1.1) predates tcx (libbpf 1.3), so the ``union bpf_attr`` members of the kernel uapi
(6.6 and later) are mirrored here: ``link_create`` with its ``tcx`` part, ``link_update``,
``link_detach``, ``query`` (which lists a hook's programs and links in the order they run) and
``struct bpf_link_info`` with its ``tcx`` part. Like every netdevice operation they act in the calling
thread's network namespace.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import ClassVar

from authd.datapath.syscalls import BPF_OBJ_GET_INFO_BY_FD, bpf

BPF_PROG_QUERY = 16
BPF_LINK_CREATE = 28
BPF_LINK_UPDATE = 29
BPF_LINK_GET_FD_BY_ID = 30
BPF_LINK_DETACH = 34

BPF_TCX_INGRESS = 46
BPF_TCX_EGRESS = 47
BPF_LINK_TYPE_TCX = 11

BPF_F_REPLACE = 1 << 2
BPF_F_BEFORE = 1 << 3

_QUERY_MAX = 64  # programs one hook can hold is far below this in practice; more is an error


class _LinkCreateAttr(ctypes.Structure):
    """``link_create`` with its ``tcx`` member (the union after ``flags`` is 8-byte aligned)."""

    _fields_: ClassVar = [
        ("prog_fd", ctypes.c_uint32),
        ("target_ifindex", ctypes.c_uint32),
        ("attach_type", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("relative_fd", ctypes.c_uint32),  # or relative_id with BPF_F_ID; 0 with BPF_F_BEFORE: first of all
        ("pad", ctypes.c_uint32),
        ("expected_revision", ctypes.c_uint64),
    ]


class _LinkUpdateAttr(ctypes.Structure):
    _fields_: ClassVar = [
        ("link_fd", ctypes.c_uint32),
        ("new_prog_fd", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("old_prog_fd", ctypes.c_uint32),
    ]


class _LinkFdAttr(ctypes.Structure):
    _fields_: ClassVar = [("link_fd", ctypes.c_uint32)]


class _IdAttr(ctypes.Structure):
    _fields_: ClassVar = [
        ("id", ctypes.c_uint32),
        ("next_id", ctypes.c_uint32),
        ("open_flags", ctypes.c_uint32),
    ]


class _QueryAttr(ctypes.Structure):
    _fields_: ClassVar = [
        ("target_ifindex", ctypes.c_uint32),
        ("attach_type", ctypes.c_uint32),
        ("query_flags", ctypes.c_uint32),
        ("attach_flags", ctypes.c_uint32),
        ("prog_ids", ctypes.c_uint64),
        ("count", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
        ("prog_attach_flags", ctypes.c_uint64),
        ("link_ids", ctypes.c_uint64),
        ("link_attach_flags", ctypes.c_uint64),
        ("revision", ctypes.c_uint64),
    ]


class _InfoAttr(ctypes.Structure):
    _fields_: ClassVar = [
        ("bpf_fd", ctypes.c_uint32),
        ("info_len", ctypes.c_uint32),
        ("info", ctypes.c_uint64),
    ]


class _LinkInfo(ctypes.Structure):
    """``struct bpf_link_info`` up to its ``tcx`` member (the union starts at 16)."""

    _fields_: ClassVar = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("prog_id", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
        ("ifindex", ctypes.c_uint32),
        ("attach_type", ctypes.c_uint32),
        ("rest", ctypes.c_uint64 * 6),  # the union's larger members, so the kernel's copy fits
    ]


@dataclass(frozen=True, slots=True)
class LinkInfo:
    """A link as the kernel describes it; ``ifindex`` 0 once its device is gone (the link is defunct)."""

    id: int
    type: int
    prog_id: int
    ifindex: int
    attach_type: int


@dataclass(frozen=True, slots=True)
class HookEntry:
    """One program on a tcx hook, in run order; ``link_id`` 0 for a program attached without a link."""

    prog_id: int
    link_id: int


def link_create_first(prog_fd: int, ifindex: int, attach_type: int) -> int:
    """Attach ``prog_fd`` with a tcx link that runs before every program on the hook; return the link fd.

    Raises OSError; EINVAL on kernels without tcx.
    """
    attr = _LinkCreateAttr(
        prog_fd=prog_fd, target_ifindex=ifindex, attach_type=attach_type, flags=BPF_F_BEFORE
    )
    return bpf(BPF_LINK_CREATE, attr)


def link_update(link_fd: int, prog_fd: int) -> None:
    """Swap the program a link runs, atomically: every packet sees the old or the new program."""
    bpf(BPF_LINK_UPDATE, _LinkUpdateAttr(link_fd=link_fd, new_prog_fd=prog_fd))


def link_detach(link_fd: int) -> None:
    """Detach a link from its hook now, whoever else still holds it (pins, other processes)."""
    bpf(BPF_LINK_DETACH, _LinkFdAttr(link_fd=link_fd))


def link_fd_by_id(link_id: int) -> int:
    """Open a link by id; the caller owns the fd."""
    return bpf(BPF_LINK_GET_FD_BY_ID, _IdAttr(id=link_id))


def link_info(link_fd: int) -> LinkInfo:
    """What the kernel says about a link."""
    info = _LinkInfo()
    bpf(
        BPF_OBJ_GET_INFO_BY_FD,
        _InfoAttr(bpf_fd=link_fd, info_len=ctypes.sizeof(info), info=ctypes.addressof(info)),
    )
    return LinkInfo(
        id=info.id,
        type=info.type,
        prog_id=info.prog_id,
        ifindex=info.ifindex if info.type == BPF_LINK_TYPE_TCX else 0,
        attach_type=info.attach_type if info.type == BPF_LINK_TYPE_TCX else 0,
    )


def query(ifindex: int, attach_type: int) -> list[HookEntry]:
    """The programs on a tcx hook, first to run first. Raises OSError (EINVAL without tcx)."""
    prog_ids = (ctypes.c_uint32 * _QUERY_MAX)()
    link_ids = (ctypes.c_uint32 * _QUERY_MAX)()
    attr = _QueryAttr(
        target_ifindex=ifindex,
        attach_type=attach_type,
        prog_ids=ctypes.addressof(prog_ids),
        count=_QUERY_MAX,
        link_ids=ctypes.addressof(link_ids),
    )
    bpf(BPF_PROG_QUERY, attr)
    return [HookEntry(prog_ids[i], link_ids[i]) for i in range(min(attr.count, _QUERY_MAX))]
