"""systemd/authd.service: `systemd-analyze verify` is clean, exposure at most 2.0, crash loops end.

How it behaves under a real systemd is tests/system's business; these are the offline checks.
"""

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
MAX_EXPOSURE = 2.0

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


def test_security_exposure_at_most_two() -> None:
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


def settings() -> dict[str, list[str]]:
    values: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            values.setdefault(key, []).append(value)
    return values


def test_a_config_error_is_not_restarted_and_a_crash_loop_ends() -> None:
    unit = settings()
    assert unit["RestartPreventExitStatus"] == ["78"]  # authd.cli.EX_CONFIG
    assert int(unit["StartLimitBurst"][0]) >= 1
    assert unit["StartLimitIntervalSec"][0] != "0"


def test_reload_waits_for_the_daemons_verdict() -> None:
    (reload,) = settings()["ExecReload"]
    assert reload.split()[:2] == [str(INSTALLED), "reload"]


def test_the_pin_dir_is_writable_below_the_read_only_sys() -> None:
    """ProtectKernelTunables= makes bpffs read-only; the default pin_dir is bound writable, made first."""
    from authd.config import Config  # noqa: PLC0415

    unit = settings()
    pin_dir = str(Config().datapath.pin_dir)
    assert unit["ProtectKernelTunables"] == ["yes"]
    assert unit["ReadWritePaths"] == [f"-{pin_dir}"]
    assert f"+/bin/mkdir -p -m 0700 {pin_dir}" in unit["ExecStartPre"]


def test_default_sockets_are_outside_the_private_tmp() -> None:
    """PrivateTmp=yes gives the daemon its own /tmp and /var/tmp: a default socket there is never found."""
    from authd.config import Config  # noqa: PLC0415

    assert settings()["PrivateTmp"] == ["yes"]
    spire = Config().spire
    for path in (spire.admin_socket, spire.server_socket, Config().node.runtime_dir):
        assert path.parts[1] not in {"tmp", "var"}, path  # /tmp, /var/tmp: private to the unit
