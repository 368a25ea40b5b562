"""Raw bpf(2) through ctypes: pinned objects, map elements and batches, object info, test runs.

libbpf is needed only to load the object and attach it; everything that runs often (map updates, dumps,
counters) goes straight to the syscall with preallocated buffers, which measured 3-4 us per element and
about 1 us per element in batches on these machines.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

_SYS_BPF = {"x86_64": 321, "aarch64": 280}

BPF_MAP_LOOKUP_ELEM = 1
BPF_MAP_UPDATE_ELEM = 2
BPF_MAP_DELETE_ELEM = 3
BPF_MAP_GET_NEXT_KEY = 4
BPF_PROG_LOAD = 5
BPF_OBJ_PIN = 6
BPF_OBJ_GET = 7
BPF_PROG_TEST_RUN = 10
BPF_PROG_GET_FD_BY_ID = 13
BPF_OBJ_GET_INFO_BY_FD = 15
BPF_MAP_LOOKUP_BATCH = 24
BPF_MAP_UPDATE_BATCH = 26
BPF_MAP_DELETE_BATCH = 27

BPF_ANY = 0
BPF_NOEXIST = 1
BPF_EXIST = 2

BPF_MAP_TYPE_HASH = 1
BPF_MAP_TYPE_ARRAY = 2
BPF_MAP_TYPE_PERCPU_ARRAY = 6
BPF_MAP_TYPE_LPM_TRIE = 11
BPF_MAP_TYPE_LRU_HASH = 9
BPF_MAP_TYPE_RINGBUF = 27
BPF_PROG_TYPE_SCHED_CLS = 3

ENOTSUPP = 524  # the kernel's internal "operation not supported", returned by some map types


class _MapElemAttr(ctypes.Structure):
    _fields_: ClassVar = [
        ("map_fd", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
        ("key", ctypes.c_uint64),
        ("value", ctypes.c_uint64),  # also next_key
        ("flags", ctypes.c_uint64),
    ]


class _BatchAttr(ctypes.Structure):
    _fields_: ClassVar = [
        ("in_batch", ctypes.c_uint64),
        ("out_batch", ctypes.c_uint64),
        ("keys", ctypes.c_uint64),
        ("values", ctypes.c_uint64),
        ("count", ctypes.c_uint32),
        ("map_fd", ctypes.c_uint32),
        ("elem_flags", ctypes.c_uint64),
        ("flags", ctypes.c_uint64),
    ]


class _ObjAttr(ctypes.Structure):
    _fields_: ClassVar = [
        ("pathname", ctypes.c_uint64),
        ("bpf_fd", ctypes.c_uint32),
        ("file_flags", ctypes.c_uint32),
    ]


class _InfoAttr(ctypes.Structure):
    _fields_: ClassVar = [
        ("bpf_fd", ctypes.c_uint32),
        ("info_len", ctypes.c_uint32),
        ("info", ctypes.c_uint64),
    ]


class _IdAttr(ctypes.Structure):
    _fields_: ClassVar = [
        ("id", ctypes.c_uint32),
        ("next_id", ctypes.c_uint32),
        ("open_flags", ctypes.c_uint32),
    ]


class _TestRunAttr(ctypes.Structure):
    _fields_: ClassVar = [
        ("prog_fd", ctypes.c_uint32),
        ("retval", ctypes.c_uint32),
        ("data_size_in", ctypes.c_uint32),
        ("data_size_out", ctypes.c_uint32),
        ("data_in", ctypes.c_uint64),
        ("data_out", ctypes.c_uint64),
        ("repeat", ctypes.c_uint32),
        ("duration", ctypes.c_uint32),
        ("ctx_size_in", ctypes.c_uint32),
        ("ctx_size_out", ctypes.c_uint32),
        ("ctx_in", ctypes.c_uint64),
        ("ctx_out", ctypes.c_uint64),
        ("flags", ctypes.c_uint32),
        ("cpu", ctypes.c_uint32),
        ("batch_size", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
    ]


class _ProgLoadAttr(ctypes.Structure):
    _fields_: ClassVar = [
        ("prog_type", ctypes.c_uint32),
        ("insn_cnt", ctypes.c_uint32),
        ("insns", ctypes.c_uint64),
        ("license", ctypes.c_uint64),
        ("log_level", ctypes.c_uint32),
        ("log_size", ctypes.c_uint32),
        ("log_buf", ctypes.c_uint64),
        ("kern_version", ctypes.c_uint32),
        ("prog_flags", ctypes.c_uint32),
        ("prog_name", ctypes.c_char * 16),
    ]


class _MapInfo(ctypes.Structure):
    _fields_: ClassVar = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("key_size", ctypes.c_uint32),
        ("value_size", ctypes.c_uint32),
        ("max_entries", ctypes.c_uint32),
        ("map_flags", ctypes.c_uint32),
        ("name", ctypes.c_char * 16),
        ("ifindex", ctypes.c_uint32),
        ("btf_vmlinux_value_type_id", ctypes.c_uint32),
        ("netns_dev", ctypes.c_uint64),
        ("netns_ino", ctypes.c_uint64),
        ("btf_id", ctypes.c_uint32),
        ("btf_key_type_id", ctypes.c_uint32),
        ("btf_value_type_id", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
        ("map_extra", ctypes.c_uint64),
    ]


class _ProgInfo(ctypes.Structure):
    """The leading fields of struct bpf_prog_info (the kernel copies only as much as asked for)."""

    _fields_: ClassVar = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("tag", ctypes.c_uint8 * 8),
        ("jited_prog_len", ctypes.c_uint32),
        ("xlated_prog_len", ctypes.c_uint32),
        ("jited_prog_insns", ctypes.c_uint64),
        ("xlated_prog_insns", ctypes.c_uint64),
        ("load_time", ctypes.c_uint64),
        ("created_by_uid", ctypes.c_uint32),
        ("nr_map_ids", ctypes.c_uint32),
        ("map_ids", ctypes.c_uint64),
        ("name", ctypes.c_char * 16),
    ]


@dataclass(frozen=True, slots=True)
class MapInfo:
    """What the kernel says about a map."""

    id: int
    type: int
    name: str
    key_size: int
    value_size: int
    max_entries: int
    flags: int


@dataclass(frozen=True, slots=True)
class ProgInfo:
    """What the kernel says about a program."""

    id: int
    type: int
    name: str
    map_ids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class TestRun:
    """Result of BPF_PROG_TEST_RUN: the program's return value and mean ns per run."""

    retval: int
    duration_ns: int


def _load_libc() -> ctypes.CDLL:
    # The process's own symbols include libc's; find_library would run ldconfig on every start, which
    # the CNI plugin (one process per pod) should not pay for.
    return ctypes.CDLL(None, use_errno=True)


_libc = _load_libc()
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long
_NR_BPF = _SYS_BPF.get(os.uname().machine, 321)


def bpf(cmd: int, attr: ctypes.Structure) -> int:
    """Call the bpf system call; raise OSError with the errno on failure."""
    result = _syscall(_NR_BPF, ctypes.c_int(cmd), ctypes.byref(attr), ctypes.c_uint(ctypes.sizeof(attr)))
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return int(result)


def obj_get(path: Path, *, read_only: bool = False) -> int:
    """Open a pinned object; the caller owns the returned fd."""
    raw = os.fsencode(path)
    attr = _ObjAttr(pathname=ctypes.cast(ctypes.c_char_p(raw), ctypes.c_void_p).value or 0)
    attr.file_flags = 1 if read_only else 0  # BPF_F_RDONLY
    try:
        return bpf(BPF_OBJ_GET, attr)
    except OSError as err:
        raise OSError(err.errno, f"{err.strerror}: {path}") from None


def obj_pin(fd: int, path: Path) -> None:
    """Pin an object at a bpffs path."""
    raw = os.fsencode(path)
    attr = _ObjAttr(pathname=ctypes.cast(ctypes.c_char_p(raw), ctypes.c_void_p).value or 0, bpf_fd=fd)
    bpf(BPF_OBJ_PIN, attr)


def map_info(fd: int) -> MapInfo:
    """Read a map's type, sizes and name."""
    info = _MapInfo()
    bpf(
        BPF_OBJ_GET_INFO_BY_FD,
        _InfoAttr(bpf_fd=fd, info_len=ctypes.sizeof(info), info=ctypes.addressof(info)),
    )
    return MapInfo(
        id=info.id,
        type=info.type,
        name=info.name.decode(errors="replace"),
        key_size=info.key_size,
        value_size=info.value_size,
        max_entries=info.max_entries,
        flags=info.map_flags,
    )


def prog_info(fd: int) -> ProgInfo:
    """Read a program's id, type, name and the ids of the maps it uses."""
    info = _ProgInfo()
    bpf(
        BPF_OBJ_GET_INFO_BY_FD,
        _InfoAttr(bpf_fd=fd, info_len=ctypes.sizeof(info), info=ctypes.addressof(info)),
    )
    count = info.nr_map_ids
    ids = (ctypes.c_uint32 * max(count, 1))()
    info2 = _ProgInfo(nr_map_ids=count, map_ids=ctypes.addressof(ids))
    bpf(
        BPF_OBJ_GET_INFO_BY_FD,
        _InfoAttr(bpf_fd=fd, info_len=ctypes.sizeof(info2), info=ctypes.addressof(info2)),
    )
    return ProgInfo(
        id=info.id,
        type=info.type,
        name=info.name.decode(errors="replace"),
        map_ids=tuple(ids[i] for i in range(min(count, info2.nr_map_ids))),
    )


def prog_fd_by_id(prog_id: int) -> int:
    """Open a program by id; the caller owns the fd."""
    return bpf(BPF_PROG_GET_FD_BY_ID, _IdAttr(id=prog_id))


# struct __sk_buff: its size and the offsets of the two fields a test run may set.
_SKB_SIZE = 192
_SKB_INGRESS_IFINDEX = 36
_SKB_IFINDEX = 40


def prog_test_run(
    prog_fd: int, packet: bytes, *, repeat: int = 1, ifindex: int = 0, ingress_ifindex: int = 0
) -> TestRun:
    """Run a tc program on ``packet`` (an Ethernet frame) ``repeat`` times in the kernel.

    The skb is on ``ifindex`` (0: the calling thread's loopback, ifindex 1) and claims to have entered
    the node through ``ingress_ifindex`` (0: sent by the node itself).
    """
    data_in = ctypes.create_string_buffer(packet, len(packet))
    data_out = ctypes.create_string_buffer(len(packet) + 256)
    ctx = ctypes.create_string_buffer(_SKB_SIZE)
    struct.pack_into("=I", ctx, _SKB_INGRESS_IFINDEX, ingress_ifindex)
    struct.pack_into("=I", ctx, _SKB_IFINDEX, ifindex)
    attr = _TestRunAttr(
        prog_fd=prog_fd,
        data_size_in=len(packet),
        data_size_out=ctypes.sizeof(data_out),
        data_in=ctypes.addressof(data_in),
        data_out=ctypes.addressof(data_out),
        repeat=repeat,
        ctx_size_in=_SKB_SIZE,
        ctx_in=ctypes.addressof(ctx),
    )
    bpf(BPF_PROG_TEST_RUN, attr)
    retval = attr.retval if attr.retval < 0x80000000 else attr.retval - 0x100000000
    return TestRun(retval=retval, duration_ns=attr.duration)


def prog_load_trivial(retval: int, name: bytes = b"authd_empty") -> int:
    """Load a two-instruction sched_cls program returning ``retval`` (a baseline for benchmarks)."""
    mov_r0 = (0xB7).to_bytes(1, "little") + b"\x00\x00\x00" + retval.to_bytes(4, "little", signed=True)
    exit_ = b"\x95" + b"\x00" * 7
    insns = ctypes.create_string_buffer(mov_r0 + exit_, 16)
    licence = ctypes.create_string_buffer(b"Apache-2.0")
    attr = _ProgLoadAttr(
        prog_type=BPF_PROG_TYPE_SCHED_CLS,
        insn_cnt=2,
        insns=ctypes.addressof(insns),
        license=ctypes.addressof(licence),
        prog_name=name,
    )
    return bpf(BPF_PROG_LOAD, attr)


class MapHandle:
    """Element access to one map by fd, with buffers sized for its key and value.

    ``value_size`` is the size of one value as the kernel reports it; for per-CPU maps a lookup returns
    ``possible_cpus`` values, each rounded up to 8 bytes.
    """

    def __init__(self, fd: int, *, owned: bool = True) -> None:
        """Wrap ``fd``; ``owned`` fds are closed by :meth:`close`."""
        self.fd = fd
        self._owned = owned
        self.info = map_info(fd)
        self.key_size = self.info.key_size
        self.value_size = self.info.value_size
        if self.info.type == BPF_MAP_TYPE_PERCPU_ARRAY:
            self.value_size = ((self.info.value_size + 7) // 8 * 8) * possible_cpus()
        self._key = ctypes.create_string_buffer(max(self.key_size, 1))
        self._value = ctypes.create_string_buffer(max(self.value_size, 1))
        self._next = ctypes.create_string_buffer(max(self.key_size, 1))
        self._attr = _MapElemAttr(map_fd=fd)

    def close(self) -> None:
        """Close the fd if this handle owns it."""
        if self._owned and self.fd >= 0:
            os.close(self.fd)
        self.fd = -1

    def lookup(self, key: bytes) -> bytes | None:
        """Return the value for ``key``, or None when absent."""
        ctypes.memmove(self._key, key, self.key_size)
        attr = self._attr
        attr.key = ctypes.addressof(self._key)
        attr.value = ctypes.addressof(self._value)
        attr.flags = 0
        try:
            bpf(BPF_MAP_LOOKUP_ELEM, attr)
        except FileNotFoundError:
            return None
        return self._value.raw[: self.value_size]

    def update(self, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
        """Insert or replace one element."""
        ctypes.memmove(self._key, key, self.key_size)
        ctypes.memmove(self._value, value, self.value_size)
        attr = self._attr
        attr.key = ctypes.addressof(self._key)
        attr.value = ctypes.addressof(self._value)
        attr.flags = flags
        bpf(BPF_MAP_UPDATE_ELEM, attr)

    def delete(self, key: bytes) -> bool:
        """Delete one element; return whether it existed."""
        ctypes.memmove(self._key, key, self.key_size)
        attr = self._attr
        attr.key = ctypes.addressof(self._key)
        attr.value = 0
        attr.flags = 0
        try:
            bpf(BPF_MAP_DELETE_ELEM, attr)
        except FileNotFoundError:
            return False
        return True

    def keys(self) -> list[bytes]:
        """Every key, by GET_NEXT_KEY (for maps without batch support, such as LPM tries)."""
        found: list[bytes] = []
        attr = self._attr
        attr.flags = 0
        attr.key = 0  # NULL: start from the first key
        attr.value = ctypes.addressof(self._next)
        while True:
            try:
                bpf(BPF_MAP_GET_NEXT_KEY, attr)
            except FileNotFoundError:
                return found
            key = self._next.raw[: self.key_size]
            found.append(key)
            ctypes.memmove(self._key, key, self.key_size)
            attr.key = ctypes.addressof(self._key)

    def items(self) -> list[tuple[bytes, bytes]]:
        """Every element: one batch syscall per few thousand entries where the map supports it."""
        ks, vs = self.key_size, self.value_size
        return [
            (keys[i * ks : (i + 1) * ks], values[i * vs : (i + 1) * vs])
            for keys, values, count in self.blocks()
            for i in range(count)
        ]

    def blocks(self) -> Iterator[tuple[bytes, bytes, int]]:
        """Every element, as blocks of ``count`` keys and ``count`` values laid end to end.

        One batch syscall per block where the map supports it, else one block of single lookups. For
        reads of a whole large map: it makes no object per element (the caller slices what it needs).
        """
        batches = self._lookup_batch()
        try:
            first = next(batches, None)
        except OSError as err:
            if err.errno not in (errno.EINVAL, errno.EOPNOTSUPP, ENOTSUPP):
                raise
        else:
            if first is not None:
                yield first
                yield from batches
            return
        keys, values = [], []
        for key in self.keys():
            value = self.lookup(key)
            if value is not None:  # deleted between the two calls
                keys.append(key)
                values.append(value)
        yield b"".join(keys), b"".join(values), len(keys)

    def _lookup_batch(self, chunk: int = 4096) -> Iterator[tuple[bytes, bytes, int]]:
        token_size = max(self.key_size, 8)
        in_token = ctypes.create_string_buffer(token_size)
        out_token = ctypes.create_string_buffer(token_size)
        first = True
        while True:
            keys = ctypes.create_string_buffer(self.key_size * chunk)
            values = ctypes.create_string_buffer(self.value_size * chunk)
            attr = _BatchAttr(
                in_batch=0 if first else ctypes.addressof(in_token),
                out_batch=ctypes.addressof(out_token),
                keys=ctypes.addressof(keys),
                values=ctypes.addressof(values),
                count=chunk,
                map_fd=self.fd,
            )
            done = False
            try:
                bpf(BPF_MAP_LOOKUP_BATCH, attr)
            except FileNotFoundError:
                done = True  # the last batch; attr.count says how many it still returned
            except OSError as err:
                if err.errno == errno.ENOSPC and attr.count == 0:
                    chunk *= 2  # one hash bucket holds more entries than the chunk
                    continue
                raise
            yield keys.raw, values.raw, attr.count
            if done:
                return
            ctypes.memmove(in_token, out_token, token_size)
            first = False

    def update_batch(self, pairs: list[tuple[bytes, bytes]], flags: int = BPF_ANY) -> None:
        """Insert or replace many elements in one syscall, falling back to single updates."""
        if not pairs:
            return
        keys = b"".join(k for k, _ in pairs)
        values = b"".join(v for _, v in pairs)
        key_buf = ctypes.create_string_buffer(keys, len(keys))
        value_buf = ctypes.create_string_buffer(values, len(values))
        attr = _BatchAttr(
            keys=ctypes.addressof(key_buf),
            values=ctypes.addressof(value_buf),
            count=len(pairs),
            map_fd=self.fd,
            elem_flags=flags,
        )
        try:
            bpf(BPF_MAP_UPDATE_BATCH, attr)
        except OSError as err:
            if err.errno not in (errno.EINVAL, errno.EOPNOTSUPP, ENOTSUPP) or attr.count:
                raise
            for key, value in pairs:
                self.update(key, value, flags)

    def delete_batch(self, keys: list[bytes]) -> int:
        """Delete many elements; missing ones are skipped. Return how many were deleted."""
        # Batch delete stops at the first missing key (ENOENT), so keys are deleted one by one: deletes
        # are rare (GC, flush) and must tolerate entries that vanished meanwhile.
        return sum(1 for key in keys if self.delete(key))


def possible_cpus() -> int:
    """Count the CPUs per-CPU maps hold a slot for (``/sys/devices/system/cpu/possible``)."""
    text = Path("/sys/devices/system/cpu/possible").read_text(encoding="ascii").strip()
    total = 0
    for part in text.split(","):
        low, _, high = part.partition("-")
        total += int(high or low) - int(low) + 1
    return total
