"""systemd/authd.service: `systemd-analyze verify` is clean; the security exposure is at most 3.0."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

UNIT = Path(__file__).parents[2] / "systemd" / "authd.service"
INSTALLED = Path("/opt/authd/bin/authd")  # ExecStart= of the unit: the venv of docs/install.md
MAX_EXPOSURE = 3.0

pytestmark = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze is not installed (Debian package systemd; `make system-deps` installs it)",
)


@pytest.fixture
def unit(tmp_path: Path) -> Iterator[Path]:
    """The unit as shipped, with its ExecStart= binary present (verify checks that it exists).

    As root, /opt/authd/bin/authd is created for the test if it is absent, and removed afterwards;
    otherwise a copy of the unit points ExecStart= at a stand-in under tmp_path.
    """
    if INSTALLED.exists():
        yield UNIT
        return
    if os.geteuid() != 0:
        stand_in = tmp_path / "authd"
        stand_in.write_text("#!/bin/sh\nexit 0\n")
        stand_in.chmod(0o755)
        copy = tmp_path / "authd.service"
        copy.write_text(UNIT.read_text().replace(str(INSTALLED), str(stand_in)))
        yield copy
        return
    created = [p for p in (INSTALLED.parents[1], INSTALLED.parent) if not p.exists()]
    INSTALLED.parent.mkdir(parents=True, exist_ok=True)
    INSTALLED.write_text("#!/bin/sh\nexit 0\n")
    INSTALLED.chmod(0o755)
    try:
        yield UNIT
    finally:
        INSTALLED.unlink()
        for directory in reversed(created):
            directory.rmdir()


def test_verify_is_clean(unit: Path) -> None:
    result = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "authd.service" not in result.stderr, result.stderr  # no warnings about the unit either


def test_security_exposure_at_most_three() -> None:
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", str(UNIT)],
        capture_output=True,
        text=True,
        check=False,
    )
    match = re.search(r"Overall exposure level for authd\.service: (\d+\.\d+)", result.stdout)
    assert match is not None, result.stdout + result.stderr
    assert float(match.group(1)) <= MAX_EXPOSURE, result.stdout


def test_bpf_syscall_is_allowed_after_the_privileged_group_is_removed() -> None:
    filters = [
        line.split("=", 1)[1]
        for line in UNIT.read_text().splitlines()
        if line.startswith("SystemCallFilter=")
    ]
    # bpf(2) is in @privileged: it must be added back after `~@privileged`, or every BPF call gets EPERM.
    removed = next(i for i, f in enumerate(filters) if "~@privileged" in f)
    assert any("bpf" in f.split() for f in filters[removed + 1 :]), filters
