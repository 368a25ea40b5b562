from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.notify import NotifyReceiver


def test_observe_explains_a_disabled_datapath(tmp_path: Path) -> None:
    config = tmp_path / "authd.toml"
    config.write_text(
        f'[node]\nname = "node-a"\nstate_dir = "{tmp_path}/state"\nruntime_dir = "{tmp_path}/run"\n'
        '[log]\nformat = "json"\n[datapath]\nenabled = false\n'
    )
    notify = NotifyReceiver(tmp_path / "notify.sock")
    try:
        daemon = subprocess.Popen(
            [sys.executable, "-m", "authd", "run", "--config", str(config)],
            env={**os.environ, "NOTIFY_SOCKET": str(notify.path)},
            stdout=subprocess.DEVNULL,
        )
        try:
            notify.wait_for("READY=1", timeout=30)
            assert (tmp_path / "run" / "authd.sock").stat().st_mode & 0o777 == 0o600
            hubble = tmp_path / "run" / "hubble.sock"
            deadline = time.monotonic() + 10
            while not hubble.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            assert hubble.stat().st_mode & 0o777 == 0o600
            result = subprocess.run(
                [sys.executable, "-m", "authd", "observe", "--config", str(config)],
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
        finally:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(timeout=30)
    finally:
        notify.close()
    assert result.returncode == 1
    assert "the datapath is disabled" in result.stderr
    assert not (tmp_path / "run" / "authd.sock").exists()


def test_observe_without_a_daemon_says_so(tmp_path: Path) -> None:
    config = tmp_path / "authd.toml"
    config.write_text(f'[node]\nruntime_dir = "{tmp_path}/run"\n')
    result = subprocess.run(
        [sys.executable, "-m", "authd", "observe", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 1
    assert "is authd running" in result.stderr
