"""What a cluster that could not tear itself down leaves behind, and how the next run removes it.

A cluster is named by its prefix: its working directory is ``<tmp>/<prefix>-*`` (with an ``owner`` file
holding the pid of the process that built it), its namespaces are ``<prefix>-*`` and its pins
``/sys/fs/bpf/<prefix>-*``. After a crash, ``kill -9`` of the harness or a teardown cut short, its
processes (dev-spire, one authd per node, the workloads) keep running in their own sessions and keep the
namespaces alive. :func:`sweep` kills them, then deletes the namespaces, pins and directories, unless the
owner is still alive: two live clusters with one prefix would tear each other down.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path

import structlog

from authd.devcluster.netns import NETNS_DIR, HarnessError, sh

log = structlog.get_logger(__name__)

BPFFS = Path("/sys/fs/bpf")
OWNER_FILE = "owner"
_KILL_WAIT_S = 5.0


def workdir_prefix(prefix: str) -> str:
    """The path prefix of every working directory of clusters named ``prefix``."""
    return str(Path(tempfile.gettempdir()) / f"{prefix}-")


def claim(workdir: Path) -> None:
    """Mark ``workdir`` as owned by this process."""
    (workdir / OWNER_FILE).write_text(f"{os.getpid()}\n")


def sweep(prefix: str) -> list[str]:
    """Remove every trace of earlier clusters named ``prefix``; return what was removed.

    Raise HarnessError if a cluster with this prefix belongs to another live process.
    """
    workdirs = sorted(Path(tempfile.gettempdir()).glob(f"{prefix}-*"))
    for workdir in workdirs:
        owner = _owner(workdir)
        if owner is not None and owner != os.getpid() and _alive(owner):
            raise HarnessError(
                f"harness: a cluster named {prefix!r} is running (pid {owner}, {workdir}); "
                "stop it or choose another prefix"
            )
    removed = [f"process {pid}" for pid in kill_processes(prefix)]
    for name in namespaces(prefix):
        with contextlib.suppress(HarnessError):
            sh("ip", "netns", "del", name)
            removed.append(f"netns {name}")
    for pins in BPFFS.glob(f"{prefix}-*"):
        shutil.rmtree(pins, ignore_errors=True)
        removed.append(str(pins))
    for workdir in workdirs:
        if workdir.is_dir() and (workdir / OWNER_FILE).exists():
            shutil.rmtree(workdir, ignore_errors=True)
            removed.append(str(workdir))
    if removed:
        log.warning("removed leftovers of an earlier run", prefix=prefix, leftovers=removed)
    return removed


def namespaces(prefix: str) -> list[str]:
    """Network namespaces named ``<prefix>-*``."""
    if not NETNS_DIR.is_dir():
        return []
    return sorted(entry.name for entry in NETNS_DIR.iterdir() if entry.name.startswith(f"{prefix}-"))


def processes(prefix: str) -> list[int]:
    """Processes of clusters named ``prefix`` (never this one or its parent).

    Found two ways: a command line that names a working directory (dev-spire's ``--dir``, authd's
    ``--config``, the workloads' traffic tool), or membership of one of the cluster's namespaces (whatever
    else ran there).
    """
    needle = workdir_prefix(prefix).encode()
    pids: set[int] = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if needle in (entry / "cmdline").read_bytes():
                    pids.add(int(entry.name))
    for name in namespaces(prefix):
        with contextlib.suppress(HarnessError):
            pids.update(int(pid) for pid in sh("ip", "netns", "pids", name).split())
    return sorted(pid for pid in pids - {os.getpid(), os.getppid()} if _alive(pid))


def kill_processes(prefix: str) -> list[int]:
    """SIGKILL every process of clusters named ``prefix``; return their pids once they are gone."""
    pids = processes(prefix)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + _KILL_WAIT_S
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.02)
    return pids


def remaining(prefix: str) -> list[str]:
    """Everything of clusters named ``prefix`` that exists now: processes, namespaces, pins, directories."""
    return [
        *(f"process {pid}" for pid in processes(prefix)),
        *(f"netns {name}" for name in namespaces(prefix)),
        *(str(pins) for pins in BPFFS.glob(f"{prefix}-*")),
        *(str(workdir) for workdir in Path(tempfile.gettempdir()).glob(f"{prefix}-*") if _owner(workdir)),
    ]


def _owner(workdir: Path) -> int | None:
    try:
        return int((workdir / OWNER_FILE).read_text().strip())
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting to be reaped does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"
