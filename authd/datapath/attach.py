"""Attaching authd's pinned programs to an interface: tcx links placed first, or legacy tc on old kernels.

Pins under the pin directory (bpffs names cannot hold dots)::

    <pin_dir>/progs/authd_in ...                  the loaded programs, one pin per ProgramName
    <pin_dir>/links/<netns inode>_<ifindex>_in    a tcx link on one hook of one interface
    <pin_dir>/links/<netns inode>_<ifindex>_eg

A link pin names the interface by its network namespace's inode and its ifindex, which together are
unique on the machine while the interface exists, so nodes in different namespaces that share a pin
directory never collide. A link whose interface is gone turns defunct (its ifindex reads 0); its pin is
replaced when a new interface gets the same name, and :meth:`Attacher.collect_defunct` removes the pins
of defunct links (the daemon after link removals, the CNI plugin on DEL), whatever namespace they were
in. Everything here acts in the calling thread's network
namespace and needs only the pins, so the CNI plugin attaches exactly as the daemon does.

Attaching is idempotent and serialised across processes by an flock on the links directory: a live link
for the interface is updated in place to the pinned program (BPF_LINK_UPDATE, atomic), otherwise a new
link is created with BPF_F_BEFORE and no anchor, which places it before every program on the hook. With
tcx, a TC_ACT_UNSPEC verdict means "next program", so authd's pass verdicts let later programs run.

Kernels without tcx (before 6.6) answer BPF_LINK_CREATE for a tcx attach type with EINVAL; in ``auto``
mode authd then attaches as a tc filter at its fixed handle and priority (BPF_TC_F_REPLACE, atomic).
"""

from __future__ import annotations

import enum
import errno
import fcntl
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Self

from authd.datapath import syscalls, tcx
from authd.datapath.layout import ProgramName
from authd.errors import DatapathError

PROGS_DIR = "progs"
LINKS_DIR = "links"


class AttachMode(enum.StrEnum):
    """How programs are attached: tcx where the kernel has it (``auto``), or always one of the two."""

    AUTO = "auto"
    TCX = "tcx"
    TC = "tc"


class Hook(enum.StrEnum):
    """The two hooks of an interface, by their suffix in link pin names."""

    INGRESS = "in"
    EGRESS = "eg"


_NAMES = frozenset({"", *(str(name) for name in ProgramName)})
_TCX_TYPES = {Hook.INGRESS: tcx.BPF_TCX_INGRESS, Hook.EGRESS: tcx.BPF_TCX_EGRESS}
_TC_POINTS = {Hook.INGRESS: 1, Hook.EGRESS: 2}  # BPF_TC_INGRESS, BPF_TC_EGRESS


def programs_for(*, l3: bool) -> dict[Hook, ProgramName]:
    """The program each hook runs, for Ethernet links or links without an Ethernet header."""
    if l3:
        return {Hook.INGRESS: ProgramName.INGRESS_L3, Hook.EGRESS: ProgramName.EGRESS_L3}
    return {Hook.INGRESS: ProgramName.INGRESS, Hook.EGRESS: ProgramName.EGRESS}


def netns_inode() -> int:
    """The inode of the calling thread's network namespace."""
    return Path("/proc/thread-self/ns/net").stat().st_ino


def _replace_pin(fd: int, path: Path) -> None:
    """Pin ``fd`` at ``path``, replacing what is there in one step (pin beside it, then rename)."""
    beside = path.with_name(path.name + "_new")
    try:
        beside.unlink(missing_ok=True)
        syscalls.obj_pin(fd, beside)
        beside.rename(path)
    except OSError as err:
        raise DatapathError(f"datapath: cannot pin {path}: {err.strerror}") from err


def pin_programs(pin_dir: Path, fds: Mapping[ProgramName, int]) -> None:
    """Pin the loaded programs, replacing the pins of an earlier run in one step each."""
    progs = pin_dir / PROGS_DIR
    try:
        progs.mkdir(mode=0o700, exist_ok=True)
    except OSError as err:
        raise DatapathError(f"datapath: cannot create {progs}: {err.strerror}") from err
    for name, fd in fds.items():
        _replace_pin(fd, progs / name)


@dataclass(frozen=True, slots=True)
class Foreign:
    """A program that runs before authd's on a hook (``name`` empty when the kernel would not say)."""

    hook: Hook
    prog_id: int
    name: str

    def describe(self) -> str:
        """``ingress prog 42 (cilium_lxc)``."""
        where = "ingress" if self.hook is Hook.INGRESS else "egress"
        return f"{where} prog {self.prog_id}" + (f" ({self.name})" if self.name else "")


@dataclass(frozen=True, slots=True)
class Attached:
    """authd's programs on one interface, and how they got there."""

    ifindex: int
    mode: AttachMode  # TCX or TC, never AUTO
    ingress_prog_id: int
    egress_prog_id: int


def _prog_name(prog_id: int) -> str:
    """A program's name by id; empty without CAP_SYS_ADMIN (or when it is gone meanwhile)."""
    try:
        fd = syscalls.prog_fd_by_id(prog_id)
    except OSError:
        return ""
    try:
        return syscalls.prog_info(fd).name
    finally:
        os.close(fd)


def _pinned_link(path: Path) -> int | None:
    try:
        return syscalls.obj_get(path)
    except FileNotFoundError:
        return None
    except OSError as err:
        raise DatapathError(f"datapath: cannot open {path}: {err.strerror}") from err


class Attacher:
    """Attaches the pinned programs under one pin directory to interfaces of the calling thread's netns."""

    def __init__(self, pin_dir: Path, *, mode: AttachMode = AttachMode.AUTO) -> None:
        """Open the pinned programs; raise DatapathError when they are missing (no authd ran here)."""
        self.pin_dir = pin_dir
        self.mode = mode
        self._links = pin_dir / LINKS_DIR
        self._fds: dict[ProgramName, int] = {}
        try:
            for name in ProgramName:
                path = pin_dir / PROGS_DIR / name
                try:
                    self._fds[name] = syscalls.obj_get(path)
                except FileNotFoundError as err:
                    raise DatapathError(
                        f"datapath: no program pinned at {path}: authd never loaded its datapath here"
                    ) from err
                except OSError as err:
                    raise DatapathError(f"datapath: cannot open {path}: {err.strerror}") from err
            self._ids = {name: syscalls.prog_info(fd).id for name, fd in self._fds.items()}
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Close the programs' fds (pins and links stay)."""
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> Self:
        """Use as a context manager that closes the fds."""
        return self

    def __exit__(self, *_exc: object) -> None:
        """Close the fds."""
        self.close()

    @property
    def prog_ids(self) -> frozenset[int]:
        """The ids of the pinned programs."""
        return frozenset(self._ids.values())

    def link_pin(self, ifindex: int, hook: Hook) -> Path:
        """Where the tcx link of ``hook`` on ``ifindex`` (in the calling thread's netns) is pinned."""
        return self._links / f"{netns_inode()}_{ifindex}_{hook}"

    @contextmanager
    def _locked(self) -> Iterator[None]:
        try:
            self._links.mkdir(mode=0o700, exist_ok=True)
            fd = os.open(self._links, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as err:
            raise DatapathError(f"datapath: cannot open {self._links}: {err.strerror}") from err
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def attach(self, ifindex: int, *, l3: bool) -> Attached:
        """Attach (or update in place) authd's programs on both hooks of ``ifindex``."""
        programs = programs_for(l3=l3)
        with self._locked():
            if self.mode is not AttachMode.TC:
                try:
                    for hook, name in programs.items():
                        self._attach_tcx(ifindex, hook, self._fds[name])
                except OSError as err:
                    if err.errno != errno.EINVAL or self.mode is AttachMode.TCX:
                        raise DatapathError(
                            f"datapath: cannot attach tcx to ifindex {ifindex}: {err.strerror}"
                        ) from err
                    self.mode = AttachMode.TC  # the kernel has no tcx: tc from now on
                else:
                    self.mode = AttachMode.TCX
                    self._detach_tc(ifindex)  # a filter left by a tc-mode run would run a second time
                    return Attached(ifindex, AttachMode.TCX, *(self._ids[n] for n in programs.values()))
            from authd.datapath import libbpf  # noqa: PLC0415 - libbpf only for kernels without tcx
            from authd.datapath.layout import TC_HANDLE, TC_PRIORITY  # noqa: PLC0415

            self._detach_tcx(ifindex)  # links left by a tcx-mode run would run an old program first
            ids = [
                libbpf.tc_attach(
                    ifindex, _TC_POINTS[hook], self._fds[name], handle=TC_HANDLE, priority=TC_PRIORITY
                )
                for hook, name in programs.items()
            ]
            return Attached(ifindex, AttachMode.TC, ids[0], ids[1])

    def _attach_tcx(self, ifindex: int, hook: Hook, prog_fd: int) -> None:
        path = self.link_pin(ifindex, hook)
        link = _pinned_link(path)
        if link is not None:
            try:
                info = tcx.link_info(link)
                if info.ifindex == ifindex and info.attach_type == _TCX_TYPES[hook]:
                    if info.prog_id != syscalls.prog_info(prog_fd).id:
                        tcx.link_update(link, prog_fd)
                    return
            finally:
                os.close(link)
        # No link, or a defunct one of an interface that had this index before.
        link = tcx.link_create_first(prog_fd, ifindex, _TCX_TYPES[hook])
        try:
            _replace_pin(link, path)
        except DatapathError:
            tcx.link_detach(link)
            raise
        finally:
            os.close(link)

    def ahead(self, ifindex: int, *, l3: bool) -> list[Foreign]:
        """Programs that run before authd's on ``ifindex``.

        Those on a tcx hook ahead of authd's link, and with tc every tcx program (tcx runs before tc).
        """
        found: list[Foreign] = []
        with self._locked():  # not in the middle of another process's attach
            for hook in programs_for(l3=l3):
                found.extend(self._ahead_on(ifindex, hook))
        return found

    def _ahead_on(self, ifindex: int, hook: Hook) -> Iterator[Foreign]:
        try:
            entries = tcx.query(ifindex, _TCX_TYPES[hook])
        except OSError as err:
            if err.errno == errno.EINVAL:  # no tcx in this kernel: nothing can run ahead of tc
                return
            raise DatapathError(f"datapath: cannot query ifindex {ifindex}: {err.strerror}") from err
        for entry in entries:
            if entry.prog_id in self.prog_ids:
                return
            yield Foreign(hook, entry.prog_id, _prog_name(entry.prog_id))

    def verify(self, ifindex: int, *, l3: bool) -> list[str]:
        """What keeps ``ifindex`` from being enforced by the pinned programs (empty: nothing)."""
        problems = []
        for hook, name in programs_for(l3=l3).items():
            link = _pinned_link(self.link_pin(ifindex, hook))
            if link is not None:
                try:
                    info = tcx.link_info(link)
                finally:
                    os.close(link)
                if info.ifindex != ifindex or info.prog_id != self._ids[name]:
                    problems.append(f"{hook} link {info.id} does not run {name} on ifindex {ifindex}")
                continue
            from authd.datapath import libbpf  # noqa: PLC0415 - libbpf only for tc filters
            from authd.datapath.layout import TC_HANDLE, TC_PRIORITY  # noqa: PLC0415

            prog_id = libbpf.tc_query(ifindex, _TC_POINTS[hook], handle=TC_HANDLE, priority=TC_PRIORITY)
            if prog_id != self._ids[name]:
                problems.append(f"no {hook} link or tc filter runs {name} on ifindex {ifindex}")
        problems += [f"{f.describe()} runs ahead of authd" for f in self.ahead(ifindex, l3=l3)]
        return problems

    def reassert_first(self, ifindex: int, *, l3: bool, spare: Mapping[ProgramName, int]) -> None:
        """Put authd's tcx links back in front of every other program, with no moment unenforced.

        A hook cannot hold one program twice, so a new first link starts with ``spare``, a second
        instance of the same program (same maps); then the old link is detached and the new one switched
        to the pinned program in place.
        """
        if self.mode is not AttachMode.TCX:
            raise DatapathError("datapath: only tcx links can be placed first")
        with self._locked():
            for hook, name in programs_for(l3=l3).items():
                path = self.link_pin(ifindex, hook)
                old = _pinned_link(path)
                try:
                    new = tcx.link_create_first(spare[name], ifindex, _TCX_TYPES[hook])
                    try:
                        if old is not None:
                            tcx.link_detach(old)
                        tcx.link_update(new, self._fds[name])
                        _replace_pin(new, path)
                    finally:
                        os.close(new)
                except OSError as err:
                    raise DatapathError(
                        f"datapath: cannot place authd first on ifindex {ifindex}: {err.strerror}"
                    ) from err
                finally:
                    if old is not None:
                        os.close(old)

    def collect_defunct(self) -> list[str]:
        """Remove the pins of links whose interface is gone (in any namespace); the names removed."""
        removed = []
        with self._locked():
            for path in sorted(self._links.iterdir()):
                link = _pinned_link(path)
                if link is None:
                    continue
                try:
                    defunct = tcx.link_info(link).ifindex == 0
                except OSError as err:
                    raise DatapathError(f"datapath: cannot inspect {path}: {err.strerror}") from err
                finally:
                    os.close(link)
                if defunct:
                    path.unlink(missing_ok=True)
                    removed.append(path.name)
        return removed

    def detach(self, ifindex: int) -> bool:
        """Remove authd's programs from ``ifindex`` (its tcx links and any tc filter); whether any were."""
        with self._locked():
            removed = self._detach_tcx(ifindex)
            return self._detach_tc(ifindex) or removed

    def _detach_tcx(self, ifindex: int) -> bool:
        removed = False
        for hook in Hook:
            path = self.link_pin(ifindex, hook)
            link = _pinned_link(path)
            if link is None:
                continue
            try:
                tcx.link_detach(link)
            except OSError as err:
                if err.errno != errno.ENOLINK:  # defunct already
                    raise DatapathError(f"datapath: cannot detach {path}: {err.strerror}") from err
            finally:
                os.close(link)
            path.unlink(missing_ok=True)
            removed = True
        return removed

    def _detach_tc(self, ifindex: int) -> bool:
        from authd.datapath import libbpf  # noqa: PLC0415 - libbpf only for tc filters
        from authd.datapath.layout import TC_HANDLE, TC_PRIORITY  # noqa: PLC0415

        removed = False
        for point in _TC_POINTS.values():
            prog_id = libbpf.tc_query(ifindex, point, handle=TC_HANDLE, priority=TC_PRIORITY)
            # authd's filter: this run's program, an earlier run's (named like it), or one the kernel
            # would not name (a program at authd's own handle and priority).
            if prog_id is not None and (prog_id in self.prog_ids or _prog_name(prog_id) in _NAMES):
                removed = libbpf.tc_detach(ifindex, point, handle=TC_HANDLE, priority=TC_PRIORITY) or removed
        return removed
