"""Run a command inside what ``systemd/authd.service`` asks systemd for, without systemd as PID 1.

Run with Debian's ``/usr/bin/python3`` (it needs the ``seccomp`` module of python3-seccomp)::

    unit_sandbox.py UNIT [--rw PATH]... [--keep PATH]... [--set KEY=VALUE]... -- ARGV...

Emulated, read from the unit's ``[Service]`` section:

- ProtectSystem=strict, ReadWritePaths=, ProtectKernelTunables=, ProtectControlGroups=: a private mount
  namespace in which every mount is read-only except ReadWritePaths and ``--rw`` paths (what
  StateDirectory= and RuntimeDirectory= would make writable);
- ProtectProc=, ProcSubset=: a proc instance of its own with ``hidepid=`` and ``subset=pid``;
- PrivateTmp=: an empty tmpfs on /tmp and /var/tmp, with the ``--keep`` paths (the test's own files
  under /tmp, which a real install keeps under /etc, /var/lib and /run) carried over;
- PrivateDevices=: a tmpfs /dev with null, zero, full, random, urandom and tty;
- CapabilityBoundingSet=, AmbientCapabilities=, NoNewPrivileges=: applied by ``setpriv`` (uid 0 keeps
  exactly the bounding set across execve);
- SystemCallFilter= (in order: the first assignment decides allow- or deny-list, later ones add or
  remove), SystemCallErrorNumber=, MemoryDenyWriteExecute=, RestrictAddressFamilies=,
  RestrictNamespaces=: one seccomp filter, loaded last, built from ``systemd-analyze syscall-filter``.

Not emulated (the caller reports these as unverified): ProtectHome= (the test interpreter may live
under /root), ProtectKernelModules=/Logs=, ProtectClock=, ProtectHostname=,
LockPersonality=, RestrictRealtime=, RestrictSUIDSGID=, RemoveIPC=, KeyringMode=, IPAddressDeny=,
DevicePolicy=, UMask=, and the cgroup side of everything.

``--set KEY=VALUE`` overrides or adds a unit setting (``--set MemoryDenyWriteExecute=yes`` tries one).
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

SECCOMP_STAGE = "--seccomp-stage"
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 0x1, 0x2, 0x4, 0x8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 0x20, 0x1000, 0x4000, 0x40000
CLONE_NEWNS = 0x00020000
NAMESPACE_FLAGS = 0x7E020080  # CLONE_NEWNS|NEWCGROUP|NEWUTS|NEWIPC|NEWUSER|NEWPID|NEWNET|NEWTIME
PROT_WRITE, PROT_EXEC, SHM_EXEC = 0x2, 0x4, 0o100000

_libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(source: str, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    _check(
        _libc.mount(
            source.encode(),
            target.encode(),
            fstype.encode() if fstype else None,
            ctypes.c_ulong(flags),
            data.encode() if data else None,
        ),
        f"mount {source} on {target}",
    )


def service_settings(unit: Path, overrides: list[str]) -> list[tuple[str, str]]:
    """The ``[Service]`` assignments in order (a key may repeat), then the overrides."""
    settings: list[tuple[str, str]] = []
    section = ""
    for raw in unit.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line
        elif section == "[Service]" and "=" in line:
            key, value = line.split("=", 1)
            settings.append((key.strip(), value.strip()))
    for override in overrides:
        key, value = override.split("=", 1)
        settings = [(k, v) for k, v in settings if k != key or key == "SystemCallFilter"]
        settings.append((key, value))
    return settings


def _last(settings: list[tuple[str, str]], key: str, default: str = "") -> str:
    values = [value for k, value in settings if k == key]
    return values[-1] if values else default


def _yes(settings: list[tuple[str, str]], key: str) -> bool:
    return _last(settings, key).lower() in {"yes", "true", "1", "on", "strict", "full"}


# ------------------------------------------------------------------------------------ file system


def _mount_points() -> list[str]:
    lines = Path("/proc/self/mountinfo").read_text().splitlines()
    return [line.split()[4].replace("\\040", " ") for line in lines]


def _under(path: str, roots: list[str]) -> bool:
    return any(path == root or path.startswith(root.rstrip("/") + "/") for root in roots)


TMP_DIRS = ("/tmp", "/var/tmp")  # noqa: S108 - PrivateTmp= replaces exactly these


def _private_tmp(keep: list[str]) -> None:
    # Open what must stay visible before the tmpfs hides it; mount it back from the open fds.
    held = [(path, os.open(path, os.O_PATH)) for path in keep]
    for tmp in TMP_DIRS:
        _mount("tmpfs", tmp, "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")
    for path, fd in held:
        Path(path).mkdir(parents=True, exist_ok=True)
        _mount(f"/proc/self/fd/{fd}", path, None, MS_BIND)
        os.close(fd)


def _private_devices() -> None:
    names = ("null", "zero", "full", "random", "urandom", "tty")
    held = {name: os.open(f"/dev/{name}", os.O_PATH) for name in names}
    _mount("tmpfs", "/dev", "tmpfs", MS_NOSUID | MS_NOEXEC, "mode=0755")
    for name, fd in held.items():
        Path(f"/dev/{name}").touch()
        _mount(f"/proc/self/fd/{fd}", f"/dev/{name}", None, MS_BIND)
        os.close(fd)


def _private_proc(settings: list[tuple[str, str]]) -> None:
    """A proc instance of its own, as systemd mounts it for ProtectProc= and ProcSubset=."""
    options = []
    if _last(settings, "ProtectProc") in {"invisible", "noaccess", "ptraceable"}:
        options.append(f"hidepid={_last(settings, 'ProtectProc')}")
    if _last(settings, "ProcSubset") == "pid":
        options.append("subset=pid")
    if options:
        _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, ",".join(options))


def _read_only(roots: list[str], writable: list[str]) -> None:
    """Remount every mount under ``roots`` read-only, except the writable ones, /proc, /dev and tmp."""
    for point in _mount_points():
        if not _under(point, roots) or _under(point, writable) or point in TMP_DIRS:
            continue
        if _under(point, ["/proc", "/dev"]) and not _under(point, ["/proc/sys"]):
            continue  # not part of ProtectSystem=
        try:
            _mount("none", point, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_REC)
        except OSError as err:
            if err.errno not in (errno.EINVAL, errno.ENOENT, errno.EACCES):
                raise


def build_file_system(settings: list[tuple[str, str]], rw: list[str], keep: list[str]) -> None:
    """A private mount namespace shaped like the unit's file-system settings."""
    _check(_libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    _mount("none", "/", None, MS_REC | MS_PRIVATE)
    writable = [p for key, v in settings if key == "ReadWritePaths" for p in v.split()] + rw
    if _yes(settings, "PrivateTmp"):
        _private_tmp(keep)
    if _yes(settings, "PrivateDevices"):
        _private_devices()
    for path in writable:
        if Path(path).exists():
            _mount(path, path, None, MS_BIND | MS_REC)
    _private_proc(settings)
    roots = ["/"] if _last(settings, "ProtectSystem") == "strict" else ["/usr", "/boot", "/efi"]
    if _yes(settings, "ProtectKernelTunables"):
        if Path("/proc/sys").exists():  # absent with ProcSubset=pid
            _mount("/proc/sys", "/proc/sys", None, MS_BIND | MS_REC)
        roots += ["/proc/sys", "/sys"]
    if _yes(settings, "ProtectControlGroups"):
        roots.append("/sys/fs/cgroup")
    _read_only(roots, writable)


# ----------------------------------------------------------------------------------------- seccomp


def _group(name: str, seen: set[str]) -> set[str]:
    """A syscall group of systemd's, expanded recursively."""
    if name in seen:
        return set()
    seen.add(name)
    out = subprocess.run(
        ["systemd-analyze", "syscall-filter", name], capture_output=True, text=True, check=True
    )
    calls: set[str] = set()
    for line in out.stdout.splitlines()[1:]:
        item = line.strip()
        if not item or item.startswith("#"):
            continue
        calls |= _group(item, seen) if item.startswith("@") else {item}
    return calls


def _names(items: str) -> set[str]:
    calls: set[str] = set()
    for item in items.split():
        calls |= _group(item, set()) if item.startswith("@") else {item}
    return calls


def _syscall_filter(settings: list[tuple[str, str]], seccomp: Any) -> Any:
    """SystemCallFilter= in order: the first assignment decides allow- or deny-list, later ones edit it."""
    deny_errno = getattr(errno, _last(settings, "SystemCallErrorNumber", "EPERM"))
    filters = [value for key, value in settings if key == "SystemCallFilter" and value]
    allow_list = bool(filters) and not filters[0].startswith("~")
    chosen: set[str] = _group("@default", set()) if allow_list else set()
    for value in filters:
        removing = value.startswith("~") == allow_list
        (chosen.difference_update if removing else chosen.update)(_names(value.removeprefix("~")))
    flt = seccomp.SyscallFilter(defaction=seccomp.ERRNO(deny_errno) if allow_list else seccomp.ALLOW)
    action = seccomp.ALLOW if allow_list else seccomp.ERRNO(deny_errno)
    for name in sorted(chosen):
        try:
            flt.add_rule(action, name)
        except (RuntimeError, ValueError, OSError):
            continue  # not a syscall of this architecture
    return flt


def load_seccomp(settings: list[tuple[str, str]]) -> None:
    """The unit's seccomp filters, built as systemd builds them."""
    import seccomp  # type: ignore[import-not-found,unused-ignore]  # noqa: PLC0415 - Debian's python3 only

    flt = _syscall_filter(settings, seccomp)
    # Like systemd, every other setting is a filter of its own that allows by default; the kernel runs
    # them all and the most restrictive answer wins. They go first: the syscall filter may deny seccomp().
    if _yes(settings, "MemoryDenyWriteExecute"):
        mdwe = seccomp.SyscallFilter(defaction=seccomp.ALLOW)
        both, eperm = PROT_WRITE | PROT_EXEC, seccomp.ERRNO(errno.EPERM)
        mdwe.add_rule(eperm, "mmap", seccomp.Arg(2, seccomp.MASKED_EQ, both, both))
        mdwe.add_rule(eperm, "mprotect", seccomp.Arg(2, seccomp.MASKED_EQ, PROT_EXEC, PROT_EXEC))
        mdwe.add_rule(eperm, "pkey_mprotect", seccomp.Arg(2, seccomp.MASKED_EQ, PROT_EXEC, PROT_EXEC))
        mdwe.add_rule(eperm, "shmat", seccomp.Arg(2, seccomp.MASKED_EQ, SHM_EXEC, SHM_EXEC))
        mdwe.load()
    families = _last(settings, "RestrictAddressFamilies")
    if families:
        allowed = {getattr(socket, name) for name in families.split()}
        restrict = seccomp.SyscallFilter(defaction=seccomp.ALLOW)
        for family in range(64):
            if family not in allowed:
                restrict.add_rule(
                    seccomp.ERRNO(errno.EAFNOSUPPORT), "socket", seccomp.Arg(0, seccomp.EQ, family)
                )
        restrict.load()
    if _yes(settings, "RestrictNamespaces"):
        namespaces = seccomp.SyscallFilter(defaction=seccomp.ALLOW)
        eperm = seccomp.ERRNO(errno.EPERM)
        namespaces.add_rule(eperm, "unshare")
        namespaces.add_rule(eperm, "setns")
        namespaces.add_rule(seccomp.ERRNO(errno.ENOSYS), "clone3")
        for bit in range(32):
            flag = 1 << bit
            if flag & NAMESPACE_FLAGS:
                namespaces.add_rule(eperm, "clone", seccomp.Arg(0, seccomp.MASKED_EQ, flag, flag))
        namespaces.load()
    flt.load()


# -------------------------------------------------------------------------------------------- main


def _caps(settings: list[tuple[str, str]], key: str) -> str:
    names = [c.removeprefix("CAP_").lower() for c in _last(settings, key).split()]
    return ",".join(["-all", *(f"+{name}" for name in names)])


def main(argv: list[str]) -> None:
    """Parse the arguments; build the file system, drop capabilities, filter syscalls, exec."""
    if argv[:1] == [SECCOMP_STAGE]:
        unit, overrides, command = Path(argv[1]), argv[2].split("\n") if argv[2] else [], argv[4:]
        load_seccomp(service_settings(unit, overrides))
        os.execvp(command[0], command)  # noqa: S606 - the command under test, no shell
    split = argv.index("--")
    options, command = argv[:split], argv[split + 1 :]
    unit = Path(options[0])
    rw = [options[i + 1] for i, o in enumerate(options) if o == "--rw"]
    keep = [options[i + 1] for i, o in enumerate(options) if o == "--keep"]
    overrides = [options[i + 1] for i, o in enumerate(options) if o == "--set"]
    settings = service_settings(unit, overrides)
    build_file_system(settings, rw, keep)
    setpriv = ["setpriv", f"--bounding-set={_caps(settings, 'CapabilityBoundingSet')}"]
    ambient = _caps(settings, "AmbientCapabilities")
    setpriv += [f"--inh-caps={ambient}", f"--ambient-caps={ambient}"]
    if _yes(settings, "NoNewPrivileges"):
        setpriv.append("--no-new-privs")
    stage = [sys.executable, __file__, SECCOMP_STAGE, str(unit), "\n".join(overrides), "--", *command]
    os.execvp("setpriv", [*setpriv, "--", *stage])  # noqa: S606 - fixed tool, no shell


if __name__ == "__main__":
    main(sys.argv[1:])
