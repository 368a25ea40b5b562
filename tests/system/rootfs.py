"""The Debian 12 root file system the real-systemd tier boots: made by debootstrap, cached per machine.

The mirror is the one apt on this machine uses (its sources lists), so a machine that can install the
project's Debian packages can build this too. The tree is cached under ``/var/cache/authd/nspawn/`` and
named after what it holds (suite, packages, mirror), so changing the package list builds a new one. A build
goes to a ``.partial`` directory, renamed into place only when complete, under a lock, so an interrupted
or concurrent build never leaves a half tree that a later run would boot.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

CACHE = Path("/var/cache/authd/nspawn")
SUITE = "bookworm"
PACKAGES = (
    "systemd",
    "systemd-sysv",
    "dbus",
    "python3",
    "python3-venv",
    "libbpf1",
    "iproute2",
    "wireguard-go",  # the userspace WireGuard backend
)
SOURCES = (Path("/etc/apt/sources.list"), Path("/etc/apt/sources.list.d"))
BUILD_TIMEOUT = 900.0


def apt_mirror(sources: tuple[Path, ...] = SOURCES) -> str:
    """The first Debian archive URI apt uses for ``SUITE`` (one-line ``deb`` or deb822 ``.sources``)."""
    files: list[Path] = []
    for source in sources:
        files.extend(sorted(source.glob("*")) if source.is_dir() else [source] if source.is_file() else [])
    for path in files:
        text = path.read_text()
        for match in re.finditer(r"^deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+(\S+)", text, re.MULTILINE):
            if match.group(2) == SUITE:
                return match.group(1)
        for stanza in re.split(r"\n\s*\n", text):
            fields = dict(re.findall(r"^(\w[\w-]*):\s*(.*)$", stanza, re.MULTILINE))
            if SUITE in fields.get("Suites", "").split() and fields.get("URIs"):
                return str(fields["URIs"].split()[0])
    raise RuntimeError(f"no apt source for Debian {SUITE} in {[str(p) for p in files]}")


def rootfs() -> tuple[Path, float | None]:
    """The cached tree, built first if missing; with the build's duration in seconds (None: cached)."""
    mirror = apt_mirror()
    key = hashlib.sha256(f"{SUITE} {' '.join(PACKAGES)} {mirror}".encode()).hexdigest()[:12]
    tree = CACHE / f"debian-{SUITE}-{key}"
    if tree.is_dir():
        return tree, None
    CACHE.mkdir(parents=True, exist_ok=True)
    with _locked(CACHE / ".lock"):
        if tree.is_dir():  # built by a concurrent run while this one waited
            return tree, None
        partial = tree.with_name(tree.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        started = time.monotonic()
        include = f"--include={','.join(PACKAGES)}"
        subprocess.run(
            ["debootstrap", "--variant=minbase", include, SUITE, str(partial), mirror],
            check=True,
            capture_output=True,
            timeout=BUILD_TIMEOUT,
        )
        # No login prompt on the console, no wait for a network that a private network never has.
        for unit in ("getty@tty1.service", "console-getty.service", "systemd-networkd-wait-online.service"):
            (partial / "etc/systemd/system" / unit).unlink(missing_ok=True)
            (partial / "etc/systemd/system" / unit).symlink_to("/dev/null")
        partial.rename(tree)
        return tree, time.monotonic() - started


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield
