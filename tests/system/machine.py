"""A Debian 12 container with systemd 252 as PID 1 (systemd-nspawn), and commands run inside it.

What BPF inside nspawn needs, found by trying (docs/install.md, "Tested under systemd"):

- capabilities: nspawn's default set has no CAP_BPF or CAP_PERFMON; ``--capability=`` adds them, and
  ``--private-network`` brings CAP_NET_ADMIN (inside the container's own network namespace);
- bpffs: nspawn gives the container a read-only /sys without /sys/fs/bpf, and its systemd mounts none.
  A fresh bpffs instance, mounted on the host outside /sys/fs/bpf, is bound to the container's
  /sys/fs/bpf: the container's pins are its own, never visible in the host's bpffs;
- seccomp: nspawn's own filter refuses bpf(2) with EPERM to every process the container's systemd starts,
  whatever its capabilities (``BPF_OBJ_GET`` of a missing pin says EPERM, not ENOENT);
  ``--system-call-filter=bpf`` adds it to nspawn's allow list. The unit's own filter then applies inside.

Commands run by :meth:`Machine.run` enter the container's namespaces with nsenter, as the host's root (the
operator at a root shell): they are not under nspawn's capability set or filter, the unit's processes are.

The container's root is the cached tree under an overlay (``--volatile=overlay``): what a test installs
vanishes with the container and the cache stays pristine. Everything started here is torn down by
:meth:`Machine.close`, which the fixtures call even when a test fails.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path

PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
BOOT_TIMEOUT = 60.0


class Machine:
    """One booted container; :meth:`run` executes a command in all of its namespaces."""

    def __init__(self, root: Path, binds: dict[Path, str]) -> None:
        """Boot ``root`` with read-only ``binds`` (host path -> container path)."""
        self.name = f"authd-test-{os.getpid()}"
        self._scratch = Path(tempfile.mkdtemp(prefix="authd-nspawn-"))
        self._bpffs = self._scratch / "bpffs"
        self._bpffs.mkdir()
        self._nspawn: subprocess.Popen[bytes] | None = None
        self.console = self._scratch / "console.log"
        try:
            subprocess.run(["mount", "-t", "bpf", "bpf", str(self._bpffs)], check=True)
            self._mounted = True
            args = [
                "systemd-nspawn", "--quiet", f"--directory={root}", "--volatile=overlay", "--boot",
                "--private-network", "--register=no", "--keep-unit", f"--machine={self.name}",
                "--capability=CAP_BPF,CAP_PERFMON,CAP_NET_ADMIN", "--system-call-filter=bpf",
                "--console=passive",
                f"--bind={self._bpffs}:/sys/fs/bpf",
                *(f"--bind-ro={host}:{inside}" for host, inside in binds.items()),
            ]  # fmt: skip
            with self.console.open("wb") as console:
                self._nspawn = subprocess.Popen(args, stdout=console, stderr=subprocess.STDOUT)
            self.leader = self._wait_for_leader()
            self._wait_for_boot()
        except BaseException:
            self.close()
            raise

    def _wait_for_leader(self) -> int:
        """The container's PID 1, as seen from the host: nspawn's child."""
        assert self._nspawn is not None
        deadline = time.monotonic() + BOOT_TIMEOUT
        children = Path(f"/proc/{self._nspawn.pid}/task/{self._nspawn.pid}/children")
        while time.monotonic() < deadline:
            if self._nspawn.poll() is not None:
                raise RuntimeError(f"systemd-nspawn exited: {self.console.read_text(errors='replace')}")
            with contextlib.suppress(FileNotFoundError):
                pids = children.read_text().split()
                if pids and Path(f"/proc/{pids[0]}/comm").read_text().strip() == "systemd":
                    return int(pids[0])
            time.sleep(0.05)
        raise RuntimeError("the container's systemd did not start")

    def _wait_for_boot(self) -> None:
        """Until the container's systemd says the boot is over (before that, it may not even listen)."""
        deadline = time.monotonic() + BOOT_TIMEOUT
        while time.monotonic() < deadline:
            state = self.run("systemctl", "is-system-running", "--wait", check=False).stdout.strip()
            if state in {"running", "degraded"}:
                return
            time.sleep(0.1)
        console = self.console.read_text(errors="replace")
        raise RuntimeError(f"the container did not finish booting: {console}")

    def run(
        self, *argv: str, timeout: float = 60.0, check: bool = True, stdin: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside the container; raise with its output when ``check`` and it fails."""
        result = subprocess.run(
            ["nsenter", f"--target={self.leader}", "--all", "--root", "--wd", "--", *argv],
            env={"PATH": PATH, "LANG": "C.UTF-8"},
            input=stdin,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"{argv} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
        return result

    def popen(self, *argv: str) -> subprocess.Popen[str]:
        """Start ``argv`` inside the container, its output piped."""
        return subprocess.Popen(
            ["nsenter", f"--target={self.leader}", "--all", "--root", "--wd", "--", *argv],
            env={"PATH": PATH, "LANG": "C.UTF-8"},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def write(self, path: str, text: str) -> None:
        """Write a file inside the container."""
        self.run("sh", "-c", f"mkdir -p \"$(dirname '{path}')\" && cat > '{path}'", stdin=text)

    def close(self) -> None:
        """Power the container off (killed if it takes too long), unmount its bpffs, remove the scratch."""
        if self._nspawn is not None and self._nspawn.poll() is None:
            self._nspawn.send_signal(signal.SIGTERM)  # nspawn asks the container's systemd to power off
            try:
                self._nspawn.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._nspawn.kill()
                self._nspawn.wait()
        if getattr(self, "_mounted", False):
            subprocess.run(["umount", str(self._bpffs)], check=False)
            self._mounted = False
        subprocess.run(["rm", "-rf", "--one-file-system", str(self._scratch)], check=False)
