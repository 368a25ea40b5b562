"""Network namespaces, links and processes for a cluster on one machine, each one remembered for teardown.

Everything made here is named with the harness's prefix, so that :mod:`authd.devcluster.leftovers` can
find what an earlier run that crashed left behind. Commands run with ``nsenter --net`` (network namespace
only), never ``ip netns exec``: that one also unshares the mount namespace, which would hide /sys/fs/bpf
from authd.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Sequence
from pathlib import Path

import structlog

from authd.errors import AuthdError

log = structlog.get_logger(__name__)

NETNS_DIR = Path("/run/netns")


class HarnessError(AuthdError):
    """The cluster harness could not build or tear down its topology."""


def sh(*argv: str) -> str:
    """Run a command; raise HarnessError with its stderr when it fails."""
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise HarnessError(f"harness: {' '.join(argv)} failed: {result.stderr.strip()}")
    return result.stdout


def in_netns(netns: str, argv: Sequence[str]) -> list[str]:
    """Prefix ``argv`` so it runs in network namespace ``netns`` (mount namespace unchanged)."""
    return ["nsenter", f"--net={NETNS_DIR / netns}", "--", *argv]


class Namespaces:
    """Creates network namespaces and deletes them all on teardown."""

    def __init__(self) -> None:
        """Start with none."""
        self.created: list[str] = []

    def add(self, name: str) -> str:
        """Create namespace ``name`` with loopback up."""
        sh("ip", "netns", "add", name)
        self.created.append(name)
        sh("ip", "-n", name, "link", "set", "lo", "up")
        return name

    def delete_all(self) -> None:
        """Delete every namespace made here (their links go with them)."""
        for name in reversed(self.created):
            with contextlib.suppress(HarnessError):
                sh("ip", "netns", "del", name)
        self.created.clear()


def sysctl(netns: str, key: str, value: str) -> None:
    """Set a per-namespace sysctl (``net.*``) inside ``netns``."""
    sh(*in_netns(netns, ["sysctl", "-q", "-w", f"{key}={value}"]))


class Processes:
    """Starts processes in their own process groups and stops them all on teardown."""

    def __init__(self) -> None:
        """Start with none."""
        self.running: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(
        self, name: str, argv: Sequence[str], *, log_path: Path, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        """Start ``argv`` with stdout and stderr appended to ``log_path``."""
        with log_path.open("ab") as output:
            proc = subprocess.Popen(
                list(argv),
                stdout=output,
                stderr=subprocess.STDOUT,
                env={**os.environ, **(env or {})},
                start_new_session=True,
            )
        self.running.append((name, proc))
        log.debug("process started", name=name, pid=proc.pid)
        return proc

    def stop(self, proc: subprocess.Popen[bytes], *, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        """Signal a process group and wait; escalate to SIGKILL after ``timeout``."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            return proc.wait()

    def stop_all(self) -> None:
        """Stop everything started here, newest first."""
        for _name, proc in reversed(self.running):
            if proc.poll() is None:
                self.stop(proc, timeout=5.0)
        self.running.clear()
