"""One QEMU guest running Debian's 6.12 kernel, which runs a command from this machine's own tree and exits.

QEMU emulates the CPU (TCG, one vCPU: KVM fails on these machines and multi-threaded TCG panics the
guest's boot; shared/notes/platform.md section 5). The guest's root is this machine's root, shared
read-only over virtio 9p, so the project, its venv and the Debian tools are the host's own; init.sh puts
an overlay over it that keeps the guest's writes in the guest's memory (a checkout under /tmp stays
visible), and fresh /run, /proc, /sys, /dev and bpffs. A second, writable 9p share, the job directory, carries
``run.sh`` in and the command's output, exit status and reports out (guest path ``/tmp/authd-guest``).

QEMU is killed when the run exceeds its deadline and when the calling process dies (``PR_SET_PDEATHSIG``).
The scratch directory is removed at the end, or by the next run if the caller was killed.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tests.kernel.image import Image

GUEST_JOB = "/tmp/authd-guest"  # noqa: S108 - the guest's own tmpfs, see init.sh
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
PR_SET_PDEATHSIG = 1
TAIL = 4000
SCRATCH_PREFIX = "authd-qemu-"
TOOLS = ("qemu-system-x86_64", "apt-get", "apt-cache", "dpkg-deb", "depmod", "busybox", "cpio")

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


@dataclass(frozen=True)
class GuestRun:
    """What a guest run left: the command's exit status (None: it never finished), its output and files."""

    returncode: int | None
    output: str
    console: str
    files: dict[str, bytes]
    seconds: float

    def describe(self) -> str:
        """The ends of the command's output and of the guest's console, for a failure message."""
        status = "did not finish" if self.returncode is None else f"exited {self.returncode}"
        return (
            f"guest command {status} after {self.seconds:.0f} s\n"
            f"--- output (last {TAIL} characters) ---\n{self.output[-TAIL:]}\n"
            f"--- console (last {TAIL} characters) ---\n{self.console[-TAIL:]}"
        )


def unavailable() -> str | None:
    """Why this machine cannot build and boot the guest (None: it can)."""
    if os.geteuid() != 0:
        return "needs root"
    absent = [tool for tool in TOOLS if shutil.which(tool) is None]
    if absent:
        return f"needs {', '.join(absent)} (`make system-deps`)"
    return None


def _die_with_parent() -> None:
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def run_in_guest(
    image: Image, argv: list[str], *, cwd: Path, env: dict[str, str], timeout: float
) -> GuestRun:
    """Boot ``image``, run ``argv`` in ``cwd`` as root with ``env``, power off; at most ``timeout`` seconds.

    ``env`` may name ``$AUTHD_GUEST_JOB`` (the job directory as the guest sees it) for files the command
    leaves for the caller: :attr:`GuestRun.files` holds every file the job directory has at the end.
    """
    _remove_stale_scratch()
    scratch = Path(tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-"))
    job = scratch / "job"
    job.mkdir()
    console = scratch / "console.log"
    exports = " ".join(f"{key}={shlex.quote(value)}" for key, value in env.items())
    (job / "run.sh").write_text(
        f"cd {shlex.quote(str(cwd))} || exit 96\n"
        f"export PATH={PATH} HOME=/tmp LANG=C.UTF-8 AUTHD_GUEST_JOB={GUEST_JOB} {exports}\n"
        f"{shlex.join(argv)} >{GUEST_JOB}/output.log 2>&1\n"
        f"echo $? >{GUEST_JOB}/returncode\n"
    )
    args = [
        "qemu-system-x86_64", "-accel", "tcg", "-cpu", "max", "-smp", "1", "-m", "1024",
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-kernel", str(image.kernel), "-initrd", str(image.initramfs),
        "-append", "console=ttyS0 panic=-1 quiet",
        "-serial", f"file:{console}",
        "-virtfs", "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
        "-virtfs", f"local,path={job},mount_tag=job,security_model=none",
    ]  # fmt: skip
    started = time.monotonic()
    qemu: subprocess.Popen[bytes] | None = None
    try:
        with (scratch / "qemu.log").open("wb") as qemu_log:
            qemu = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=qemu_log,
                preexec_fn=_die_with_parent,  # noqa: PLW1509 - only prctl, before exec
            )
        with contextlib.suppress(subprocess.TimeoutExpired):
            qemu.wait(timeout=timeout)
        _stop(qemu)
        return _collect(scratch, job, console, time.monotonic() - started)
    finally:
        if qemu is not None:
            _stop(qemu)
        shutil.rmtree(scratch, ignore_errors=True)


def _stop(qemu: subprocess.Popen[bytes]) -> None:
    if qemu.poll() is None:
        qemu.kill()
        qemu.wait()


def _remove_stale_scratch() -> None:
    """Scratch directories of runs whose process died before it could remove them (SIGKILL)."""
    for path in Path(tempfile.gettempdir()).glob(f"{SCRATCH_PREFIX}*-*"):
        pid = path.name.removeprefix(SCRATCH_PREFIX).split("-")[0]
        if pid.isdigit() and not Path("/proc", pid).exists():
            shutil.rmtree(path, ignore_errors=True)


def _collect(scratch: Path, job: Path, console: Path, seconds: float) -> GuestRun:
    returncode_file = job / "returncode"
    returncode = int(returncode_file.read_text()) if returncode_file.is_file() else None
    output_file = job / "output.log"
    text = console.read_text(errors="replace") if console.is_file() else ""
    qemu_log = (scratch / "qemu.log").read_text(errors="replace")
    files = {path.name: path.read_bytes() for path in job.iterdir() if path.is_file()}
    return GuestRun(
        returncode=returncode,
        output=output_file.read_text(errors="replace") if output_file.is_file() else "",
        console=text + (f"\n--- qemu ---\n{qemu_log}" if qemu_log.strip() else ""),
        files=files,
        seconds=seconds,
    )
