"""A thin ctypes binding to the system libbpf (``libbpf.so.1``): open, load, pin, tc attach and detach.

Only what loading needs is bound: relocating and loading an ELF object with its BTF, reusing maps pinned
by name under a pin root, and libbpf's netlink tc helpers. Map access goes through :mod:`syscalls`.
libbpf's tc helpers act in the calling *thread's* network namespace (see :mod:`netns`).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
from pathlib import Path
from typing import Any, ClassVar

import structlog

from authd.errors import DatapathError

log = structlog.get_logger(__name__)

BPF_TC_INGRESS = 1
BPF_TC_EGRESS = 2
BPF_TC_F_REPLACE = 1

_LIBBPF_WARN, _LIBBPF_INFO, _LIBBPF_DEBUG = 0, 1, 2
_KERNEL_LOG_SIZE = 1 << 20


class _OpenOpts(ctypes.Structure):
    """struct bpf_object_open_opts (libbpf 1.1), up to kernel_log_level."""

    _fields_: ClassVar = [
        ("sz", ctypes.c_size_t),
        ("object_name", ctypes.c_char_p),
        ("relaxed_maps", ctypes.c_bool),
        ("pin_root_path", ctypes.c_char_p),
        ("attach_prog_fd", ctypes.c_uint32),  # removed field, kept as padding by libbpf
        ("kconfig", ctypes.c_char_p),
        ("btf_custom_path", ctypes.c_char_p),
        ("kernel_log_buf", ctypes.c_void_p),
        ("kernel_log_size", ctypes.c_size_t),
        ("kernel_log_level", ctypes.c_uint32),
    ]


class _TcHook(ctypes.Structure):
    """struct bpf_tc_hook."""

    _fields_: ClassVar = [
        ("sz", ctypes.c_size_t),
        ("ifindex", ctypes.c_int),
        ("attach_point", ctypes.c_int),
        ("parent", ctypes.c_uint32),
    ]


class _TcOpts(ctypes.Structure):
    """struct bpf_tc_opts."""

    _fields_: ClassVar = [
        ("sz", ctypes.c_size_t),
        ("prog_fd", ctypes.c_int),
        ("flags", ctypes.c_uint32),
        ("prog_id", ctypes.c_uint32),
        ("handle", ctypes.c_uint32),
        ("priority", ctypes.c_uint32),
    ]


_PrintFn = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)


class _Lib:
    """The loaded library with typed functions; one per process, created on first use."""

    _instance: ClassVar[_Lib | None] = None
    _lock: ClassVar = threading.Lock()

    def __init__(self) -> None:
        name = ctypes.util.find_library("bpf") or "libbpf.so.1"
        try:
            lib = ctypes.CDLL(name, use_errno=True)
        except OSError as err:
            raise DatapathError(f"datapath: cannot load libbpf ({name}): install libbpf1") from err
        self.lib = lib
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        self._vsnprintf = libc.vsnprintf
        self._vsnprintf.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_void_p]
        self._printer = _PrintFn(self._print)  # kept referenced: libbpf holds the pointer
        self._messages = threading.local()
        self._sig(lib.libbpf_set_print, ctypes.c_void_p, [_PrintFn])
        lib.libbpf_set_print(self._printer)
        self._sig(lib.bpf_object__open_file, ctypes.c_void_p, [ctypes.c_char_p, ctypes.POINTER(_OpenOpts)])
        self._sig(lib.bpf_object__load, ctypes.c_int, [ctypes.c_void_p])
        self._sig(lib.bpf_object__close, None, [ctypes.c_void_p])
        self._sig(lib.bpf_object__find_map_by_name, ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_char_p])
        self._sig(lib.bpf_object__find_program_by_name, ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_char_p])
        self._sig(lib.bpf_map__set_max_entries, ctypes.c_int, [ctypes.c_void_p, ctypes.c_uint32])
        self._sig(lib.bpf_map__max_entries, ctypes.c_uint32, [ctypes.c_void_p])
        self._sig(lib.bpf_map__fd, ctypes.c_int, [ctypes.c_void_p])
        self._sig(lib.bpf_map__pin_path, ctypes.c_char_p, [ctypes.c_void_p])
        self._sig(lib.bpf_program__fd, ctypes.c_int, [ctypes.c_void_p])
        for fn in ("bpf_tc_hook_create", "bpf_tc_hook_destroy"):
            self._sig(getattr(lib, fn), ctypes.c_int, [ctypes.POINTER(_TcHook)])
        for fn in ("bpf_tc_attach", "bpf_tc_detach", "bpf_tc_query"):
            self._sig(getattr(lib, fn), ctypes.c_int, [ctypes.POINTER(_TcHook), ctypes.POINTER(_TcOpts)])

    @staticmethod
    def _sig(fn: Any, restype: object, argtypes: list[object]) -> None:  # noqa: ANN401 - a ctypes function
        fn.restype = restype
        fn.argtypes = argtypes

    @classmethod
    def get(cls) -> _Lib:
        with cls._lock:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance

    def _print(self, level: int, fmt: bytes, args: int) -> int:
        buf = ctypes.create_string_buffer(4096)
        self._vsnprintf(buf, len(buf), fmt, args)
        text = buf.value.decode(errors="replace").rstrip()
        if level <= _LIBBPF_INFO:
            messages: list[str] | None = getattr(self._messages, "lines", None)
            if messages is not None:
                messages.append(text)
        if level == _LIBBPF_WARN:
            log.debug("libbpf", message=text)
        return 0

    def collect(self) -> list[str]:
        """Start collecting this thread's libbpf warnings; the list fills as libbpf prints."""
        lines: list[str] = []
        self._messages.lines = lines
        return lines


def _errno_text(code: int) -> str:
    return os.strerror(abs(code))


class BpfObject:
    """One opened (then loaded) ELF object. Close it to release the programs' fds; pinned maps stay."""

    def __init__(self, path: Path, *, pin_root: Path) -> None:
        """Open the object; maps declared with LIBBPF_PIN_BY_NAME will pin under (or reuse) ``pin_root``."""
        self._lib = _Lib.get()
        lib = self._lib.lib
        self.path = path
        self._pin_root = os.fsencode(pin_root)
        self._log_buf = ctypes.create_string_buffer(_KERNEL_LOG_SIZE)
        opts = _OpenOpts(sz=ctypes.sizeof(_OpenOpts), pin_root_path=self._pin_root)
        opts.kernel_log_buf = ctypes.addressof(self._log_buf)
        opts.kernel_log_size = _KERNEL_LOG_SIZE
        self._opts = opts
        messages = self._lib.collect()
        ctypes.set_errno(0)
        handle = lib.bpf_object__open_file(os.fsencode(path), ctypes.byref(opts))
        if not handle:
            code = ctypes.get_errno()
            detail = "; ".join(messages[-3:]) or _errno_text(code)
            raise DatapathError(f"datapath: cannot open BPF object {path}: {detail}")
        self._handle: int | None = handle

    def _obj(self) -> int:
        if self._handle is None:
            raise DatapathError("datapath: BPF object already closed")
        return self._handle

    def _map(self, name: str) -> int:
        found = self._lib.lib.bpf_object__find_map_by_name(self._obj(), name.encode())
        if not found:
            raise DatapathError(f"datapath: map {name!r} not in {self.path}")
        return int(found)

    def set_max_entries(self, name: str, entries: int) -> None:
        """Size a map before load."""
        code = self._lib.lib.bpf_map__set_max_entries(self._map(name), entries)
        if code < 0:
            raise DatapathError(f"datapath: cannot size map {name!r} to {entries}: {_errno_text(code)}")

    def max_entries(self, name: str) -> int:
        """The size a map will be (or was) created with."""
        return int(self._lib.lib.bpf_map__max_entries(self._map(name)))

    def load(self) -> None:
        """Create or reuse the maps, then verify and load every program."""
        messages = self._lib.collect()
        code = self._lib.lib.bpf_object__load(self._obj())
        if code < 0:
            verifier = self._log_buf.value.decode(errors="replace").strip().splitlines()
            detail = "; ".join(messages[-4:]) or _errno_text(code)
            if verifier:
                detail += " | verifier: " + " / ".join(verifier[-8:])
            if any("parameter mismatch" in line for line in messages):
                detail += (
                    " | the pinned maps do not match this authd's layout: `authd bpf unload` removes them"
                    " (and every entry in them)"
                )
            raise DatapathError(f"datapath: cannot load BPF object {self.path}: {detail}")

    def map_fd(self, name: str) -> int:
        """The fd of a loaded map, owned by this object (dup it to keep it after close)."""
        fd = int(self._lib.lib.bpf_map__fd(self._map(name)))
        if fd < 0:
            raise DatapathError(f"datapath: map {name!r} is not loaded")
        return fd

    def prog_fd(self, name: str) -> int:
        """The fd of a loaded program, owned by this object."""
        prog = self._lib.lib.bpf_object__find_program_by_name(self._obj(), name.encode())
        if not prog:
            raise DatapathError(f"datapath: program {name!r} not in {self.path}")
        fd = int(self._lib.lib.bpf_program__fd(prog))
        if fd < 0:
            raise DatapathError(f"datapath: program {name!r} is not loaded")
        return fd

    def close(self) -> None:
        """Release the object; attached programs stay attached, pinned maps stay pinned."""
        if self._handle is not None:
            self._lib.lib.bpf_object__close(self._handle)
            self._handle = None


def _hook(ifindex: int, attach_point: int) -> _TcHook:
    return _TcHook(sz=ctypes.sizeof(_TcHook), ifindex=ifindex, attach_point=attach_point)


def tc_attach(ifindex: int, attach_point: int, prog_fd: int, *, handle: int, priority: int) -> int:
    """Attach ``prog_fd`` as a direct-action clsact filter, atomically replacing authd's previous one.

    Creates the clsact qdisc when missing. Returns the attached program's id.
    """
    lib = _Lib.get().lib
    hook = _hook(ifindex, attach_point)
    code = lib.bpf_tc_hook_create(ctypes.byref(hook))
    if code < 0 and -code != 17:  # EEXIST: the qdisc is there already (ours from before, or another's)
        raise DatapathError(f"datapath: cannot create clsact on ifindex {ifindex}: {_errno_text(code)}")
    opts = _TcOpts(
        sz=ctypes.sizeof(_TcOpts), prog_fd=prog_fd, flags=BPF_TC_F_REPLACE, handle=handle, priority=priority
    )
    code = lib.bpf_tc_attach(ctypes.byref(hook), ctypes.byref(opts))
    if code < 0:
        raise DatapathError(f"datapath: cannot attach to ifindex {ifindex}: {_errno_text(code)}")
    return int(opts.prog_id)


def tc_query(ifindex: int, attach_point: int, *, handle: int, priority: int) -> int | None:
    """The id of the program attached at (handle, priority), or None."""
    lib = _Lib.get().lib
    hook = _hook(ifindex, attach_point)
    opts = _TcOpts(sz=ctypes.sizeof(_TcOpts), handle=handle, priority=priority)
    code = lib.bpf_tc_query(ctypes.byref(hook), ctypes.byref(opts))
    if code < 0:
        if -code in (2, 19, 22):  # ENOENT, ENODEV, EINVAL: no such filter or no clsact qdisc
            return None
        raise DatapathError(f"datapath: cannot query tc on ifindex {ifindex}: {_errno_text(code)}")
    return int(opts.prog_id)


def tc_detach(ifindex: int, attach_point: int, *, handle: int, priority: int) -> bool:
    """Remove the filter at (handle, priority); return whether one was there."""
    lib = _Lib.get().lib
    hook = _hook(ifindex, attach_point)
    opts = _TcOpts(sz=ctypes.sizeof(_TcOpts), handle=handle, priority=priority)
    code = lib.bpf_tc_detach(ctypes.byref(hook), ctypes.byref(opts))
    if code < 0:
        if -code in (2, 19, 22):
            return False
        raise DatapathError(f"datapath: cannot detach from ifindex {ifindex}: {_errno_text(code)}")
    return True
