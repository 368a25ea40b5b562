from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def authd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "authd", *args], capture_output=True, text=True, timeout=60, check=False
    )


def test_run_with_missing_config_exits_78_naming_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "absent.toml"
    result = authd("run", "--config", str(missing))
    assert result.returncode == 78
    assert f"{missing}: config file not found" in result.stderr
    assert "Traceback" not in result.stderr


def test_unknown_key_exits_78_naming_the_key(tmp_path: Path) -> None:
    config = tmp_path / "authd.toml"
    config.write_text('[daemon]\nshutdown_timeuot = "5s"\n')
    result = authd("run", "--config", str(config))
    assert result.returncode == 78
    assert 'daemon.shutdown_timeuot: unknown key (did you mean "shutdown_timeout"?)' in result.stderr
    assert "Traceback" not in result.stderr


def test_wrong_type_exits_78_naming_key_path_and_type(tmp_path: Path) -> None:
    config = tmp_path / "authd.toml"
    config.write_text("[log]\nformat = true\n")
    result = authd("run", "--config", str(config))
    assert result.returncode == 78
    assert 'log.format: must be one of "auto", "json", "console", got boolean true' in result.stderr
    assert "Traceback" not in result.stderr


def test_config_check_accepts_the_example_and_prints_effective_config() -> None:
    result = authd("config", "check", "--config", str(REPO / "config" / "authd.example.toml"))
    assert result.returncode == 0, result.stderr
    assert "[daemon]" in result.stdout
    assert 'shutdown_timeout = "10s"' in result.stdout


def test_config_check_rejects_bad_config_with_78(tmp_path: Path) -> None:
    config = tmp_path / "authd.toml"
    config.write_text('[node]\nruntime_dir = "run/authd"\n')
    result = authd("config", "check", "--config", str(config))
    assert result.returncode == 78
    assert 'node.runtime_dir: must be an absolute path, got "run/authd"' in result.stderr


def test_version() -> None:
    result = authd("version")
    assert result.returncode == 0
    assert result.stdout.startswith("authd ")


def test_bad_encryption_mode_exits_78_naming_the_key(tmp_path: Path) -> None:
    config = tmp_path / "authd.toml"
    config.write_text('[encryption]\nmode = "on"\n')
    result = authd("run", "--config", str(config))
    assert result.returncode == 78
    assert 'encryption.mode: must be one of "off", "wireguard", got "on"' in result.stderr
