"""The QEMU guest runner (tests/kernel/guest.py) never leaves QEMU running: past its deadline, or orphaned."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.kernel.guest import SCRATCH_PREFIX, run_in_guest, unavailable
from tests.kernel.image import Image, image

pytestmark = pytest.mark.privileged

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def built() -> Image:
    reason = unavailable()
    if reason is not None:
        if os.environ.get("AUTHD_REQUIRE_PRIVILEGED") == "1":
            pytest.fail(f"the QEMU guest cannot run here and CI requires it: {reason}")
        pytest.skip(reason)
    return image()[0]


def _qemu_children(pid: int) -> list[int]:
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [int(child) for child in children if _running_qemu(int(child))]


def _running_qemu(pid: int) -> bool:
    """Whether ``pid`` is a QEMU that has not exited (a zombie waiting for its reaper has)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    comm, state = stat[stat.index("(") + 1 : stat.rindex(")")], stat[stat.rindex(")") + 2]
    return comm.startswith("qemu-system") and state != "Z"


def test_a_guest_past_its_deadline_is_killed_and_reports_what_it_wrote(built: Image) -> None:
    run = run_in_guest(built, ["sh", "-c", "echo started; sleep 600"], cwd=Path("/"), env={}, timeout=30)
    assert run.returncode is None
    assert "started" in run.output
    assert "did not finish after" in run.describe()
    assert not _qemu_children(os.getpid())


def test_qemu_dies_with_the_process_that_started_it(built: Image) -> None:
    del built  # the child builds nothing: the image is cached
    code = (
        "from pathlib import Path; from tests.kernel.guest import run_in_guest; "
        "from tests.kernel.image import image; "
        "run_in_guest(image()[0], ['sleep', '600'], cwd=Path('/'), env={}, timeout=600)"
    )
    parent = subprocess.Popen([sys.executable, "-c", code], cwd=REPO)
    qemu: list[int] = []
    try:
        deadline = time.monotonic() + 30
        while not qemu and time.monotonic() < deadline:
            qemu = _qemu_children(parent.pid)
            time.sleep(0.1)
        assert qemu, "the child started no QEMU"
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 10
        while _running_qemu(qemu[0]) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _running_qemu(qemu[0]), "QEMU outlived the process that started it"
    finally:
        parent.kill()
        parent.wait()
        for pid in qemu:
            if _running_qemu(pid):
                os.kill(pid, signal.SIGKILL)
        for scratch in Path(tempfile.gettempdir()).glob(f"{SCRATCH_PREFIX}{parent.pid}-*"):
            shutil.rmtree(scratch)
