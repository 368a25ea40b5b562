"""The guest is what the tier promises: the 6.12 kernel, root, this tree's venv, writes kept in memory."""

from __future__ import annotations

import os
import secrets
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_the_guest_runs_the_612_kernel_as_root_with_the_projects_venv() -> None:
    assert os.uname().release.startswith("6.12."), os.uname().release
    assert os.geteuid() == 0
    assert Path(sys.prefix) == REPO / ".venv"
    assert os.environ["AUTHD_REQUIRE_PRIVILEGED"] == "1"


def test_writes_to_the_shared_root_stay_in_the_guests_memory() -> None:
    mounts = [line.split() for line in Path("/proc/self/mounts").read_text().splitlines()]
    (root,) = (mount for mount in mounts if mount[1] == "/")
    assert root[2] == "overlay", root
    assert "upperdir=/rw/upper" in root[3].split(","), root
    probe = Path("/etc") / f"authd-guest-{secrets.token_hex(4)}"
    probe.write_text("written in the guest")
    assert probe.read_text() == "written in the guest"
