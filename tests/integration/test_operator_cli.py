"""What an operator meets at the command line: one daemon per state dir, a reload that tells the truth."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.notify import NotifyReceiver


def authd_cli(*args: str, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*prefix, sys.executable, "-m", "authd", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def write_config(path: Path, tmp: Path, level: str = "info") -> Path:
    path.write_text(
        f'[node]\nname = "node-a"\nstate_dir = "{tmp}/state"\nruntime_dir = "{tmp}/run"\n'
        f'[log]\nformat = "json"\nlevel = "{level}"\n[datapath]\nenabled = false\n'
    )
    return path


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[tuple[Path, subprocess.Popen[str]]]:
    """A running ``authd run`` (no SPIRE, no datapath), ready; stopped afterwards."""
    config = write_config(tmp_path / "authd.toml", tmp_path)
    notify = NotifyReceiver(tmp_path / "notify.sock")
    proc = subprocess.Popen(
        [sys.executable, "-m", "authd", "run", "--config", str(config)],
        env={**os.environ, "NOTIFY_SOCKET": str(notify.path)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        notify.wait_for("READY=1", timeout=30)
        yield config, proc
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
        notify.close()


def test_a_second_daemon_on_the_same_state_dir_exits_and_leaves_the_first_alone(
    tmp_path: Path, daemon: tuple[Path, subprocess.Popen[str]]
) -> None:
    config, first = daemon
    control = tmp_path / "run" / "authd.sock"
    before = control.stat().st_ino
    second = authd_cli("run", "--config", str(config))
    assert second.returncode == 1
    assert f"another authd (pid {first.pid}) already runs with state directory {tmp_path}/state" in (
        second.stderr
    )
    assert "Traceback" not in second.stderr
    assert control.stat().st_ino == before  # same socket: not replaced, not removed
    assert authd_cli("status", "--config", str(config)).returncode == 0
    assert first.poll() is None


def test_reload_reports_the_verdict(tmp_path: Path, daemon: tuple[Path, subprocess.Popen[str]]) -> None:
    config, _ = daemon
    write_config(config, tmp_path, level="debug")
    good = authd_cli("reload", "--config", str(config))
    assert (good.returncode, good.stdout) == (0, "config reloaded\n"), good.stderr

    # The daemon re-reads its own file: a valid file for the client, a broken one for the daemon.
    client_config = write_config(tmp_path / "client.toml", tmp_path)
    config.write_text(config.read_text() + "[daemon]\nshutdown_timeuot = 1\n")
    bad = authd_cli("reload", "--config", str(client_config))
    assert bad.returncode == 1
    assert "reload: config rejected, the running one stays: daemon.shutdown_timeuot: unknown key" in (
        bad.stderr
    )
    # With the broken file itself, the client already refuses it, as `config check` would.
    local = authd_cli("reload", "--config", str(config))
    assert local.returncode == 78
    assert "daemon.shutdown_timeuot: unknown key" in local.stderr


def test_reload_without_a_daemon_fails(tmp_path: Path) -> None:
    result = authd_cli("reload", "--config", str(write_config(tmp_path / "authd.toml", tmp_path)))
    assert result.returncode == 1
    assert "is authd running?" in result.stderr


def test_version_flag() -> None:
    result = authd_cli("--version")
    assert result.returncode == 0
    assert result.stdout.startswith("authd ")


def test_an_unknown_flag_gets_the_subcommands_usage() -> None:
    result = authd_cli("bpf", "auth", "list", "--bogus")
    assert result.returncode == 2
    assert result.stderr.startswith("usage: authd bpf auth list")
    assert "unrecognized arguments: --bogus" in result.stderr


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv")
def test_a_non_root_run_says_it_needs_root() -> None:
    with tempfile.TemporaryDirectory() as directory:
        config = Path(directory) / "authd.toml"
        config.write_text('[node]\nname = "node-a"\n')  # state in /var/lib/authd, root's
        config.chmod(0o644)
        Path(directory).chmod(0o755)
        nobody = ("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups")
        result = authd_cli("run", "--config", str(config), prefix=nobody)
    assert result.returncode == 1, result.stderr
    assert "permission denied; authd runs as root" in result.stderr
    assert "Traceback" not in result.stderr
