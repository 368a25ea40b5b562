"""The real-systemd tier: authd installed as docs/install.md says, in a container booting systemd 252.

Runs when the machine allows it (root, systemd-nspawn, debootstrap); in CI (AUTHD_REQUIRE_PRIVILEGED=1)
a machine that does not is an error, never a skip. One container serves the whole module; the first run on
a machine builds the Debian tree (tests/system/rootfs.py), later runs reuse it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.system.machine import Machine
from tests.system.rootfs import rootfs

REPO = Path(__file__).resolve().parents[2]
WHEELS = Path("/var/cache/authd/wheels")
TOOLS = ("systemd-nspawn", "debootstrap", "nsenter")


def _missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    absent = [tool for tool in TOOLS if shutil.which(tool) is None]
    if absent:
        return f"needs {', '.join(absent)} (Debian systemd-container, debootstrap; `make system-deps`)"
    return None


@pytest.fixture(scope="session")
def timings() -> Iterator[dict[str, float]]:
    """Figures the tier measures, printed at the end of the session (pytest -s shows them)."""
    figures: dict[str, float] = {}
    started = time.monotonic()
    yield figures
    figures["tier wall time, s"] = time.monotonic() - started
    for name, value in figures.items():
        print(f"\n[system tier] {name}: {value:.2f}")  # noqa: T201 - the measured figures, for the report


@pytest.fixture(scope="session")
def wheelhouse() -> Iterator[Path]:
    """authd's wheel, built from this tree, and every dependency as a wheel (cached), for an offline pip."""
    missing = _missing()
    if missing:
        if os.environ.get("AUTHD_REQUIRE_PRIVILEGED") == "1":
            pytest.fail(f"the real-systemd tier cannot run here and CI requires it: {missing}")
        pytest.skip(missing)
    with tempfile.TemporaryDirectory(prefix="authd-wheel-") as directory:
        built = Path(directory)
        pip = [sys.executable, "-m", "pip", "-q"]
        subprocess.run([*pip, "wheel", "--no-deps", "-w", str(built / "authd"), str(REPO)], check=True)
        (wheel,) = (built / "authd").glob("authd-*.whl")
        WHEELS.mkdir(parents=True, exist_ok=True)
        subprocess.run([*pip, "download", "--only-binary=:all:", "-d", str(WHEELS), str(wheel)], check=True)
        shutil.copy(wheel, built / wheel.name)
        for stale in (built / "authd").iterdir():
            stale.unlink()
        (built / "authd").rmdir()
        yield built


@pytest.fixture(scope="module")
def machine(wheelhouse: Path, timings: dict[str, float]) -> Iterator[Machine]:
    """A booted container with authd installed (not started): the venv, the unit, /etc/authd, dev-spire."""
    started = time.monotonic()
    tree, built_in = rootfs()
    if built_in is not None:
        timings["rootfs build (cold), s"] = built_in
    node = Machine(tree, {wheelhouse: "/wheels/authd", WHEELS: "/wheels/deps"})
    try:
        timings["container boot, s"] = time.monotonic() - started
        yield node
    finally:
        node.close()
