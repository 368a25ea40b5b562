from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from authd.control import ControlClient, socket_path
from authd.errors import ControlError
from tests.notify import NotifyReceiver


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifyReceiver]:
    receiver = NotifyReceiver(tmp_path / "notify.sock")
    yield receiver
    receiver.close()


def start_authd(config: Path, notify: NotifyReceiver, **extra_env: str) -> subprocess.Popen[str]:
    env = {**os.environ, "NOTIFY_SOCKET": str(notify.path), **extra_env}
    return subprocess.Popen(
        [sys.executable, "-m", "authd", "run", "--config", str(config)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def write_config(path: Path, *, level: str = "info", timeout: str = "5s") -> Path:
    path.write_text(
        f'[node]\nname = "node-a"\nstate_dir = "{path.parent}/state"\nruntime_dir = "{path.parent}/run"\n'
        f'[log]\nlevel = "{level}"\nformat = "json"\n[daemon]\nshutdown_timeout = "{timeout}"\n'
        "[datapath]\nenabled = false\n"
    )
    return path


def events(output: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in output.splitlines() if line.startswith("{")]


def test_ready_then_graceful_stop_on_sigterm(tmp_path: Path, notify: NotifyReceiver) -> None:
    proc = start_authd(write_config(tmp_path / "authd.toml", timeout="3s"), notify)
    try:
        notify.wait_for("READY=1", timeout=30)
        proc.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        notify.wait_for("STOPPING=1", timeout=3)
        assert proc.wait(timeout=3) == 0
        assert time.monotonic() - sent < 3
    finally:
        proc.kill()
        output = proc.communicate()[0]
    names = [e["event"] for e in events(output)]
    assert names.index("authd ready") < names.index("authd stopping") < names.index("authd stopped")


def test_sighup_with_invalid_config_keeps_running(tmp_path: Path, notify: NotifyReceiver) -> None:
    config = write_config(tmp_path / "authd.toml")
    proc = start_authd(config, notify)
    try:
        notify.wait_for("READY=1", timeout=30)
        config.write_text('[log]\nlevel = "loud"\n')
        proc.send_signal(signal.SIGHUP)
        notify.wait_for("RELOADING=1", timeout=5)
        write_config(config, level="debug")
        notify.messages.clear()
        proc.send_signal(signal.SIGHUP)
        notify.wait_for("RELOADING=1", timeout=5)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        proc.kill()
        output = proc.communicate()[0]
    logged = events(output)
    rejected = [e for e in logged if e["event"] == "config reload rejected, keeping the running config"]
    assert rejected
    assert rejected[0]["problems"] == [
        'log.level: must be one of "debug", "info", "warning", "error", got "loud"'
    ]
    assert any(e["event"] == "config reloaded" for e in logged)


def test_watchdog_is_fed_when_armed(tmp_path: Path, notify: NotifyReceiver) -> None:
    config = write_config(tmp_path / "authd.toml")
    proc = start_authd(config, notify, WATCHDOG_USEC="200000")
    try:
        notify.wait_for("READY=1", timeout=30)
        notify.messages.clear()
        notify.wait_for("WATCHDOG=1", timeout=2)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)
        proc.communicate()


def test_notify_socket_nobody_reads_never_freezes_the_daemon(tmp_path: Path) -> None:
    # A bound datagram socket that is never read: its queue (net.unix.max_dgram_qlen, 10 by default)
    # fills after a few SIGHUPs, and a blocking send would stall the event loop from then on.
    unread = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    unread.bind(str(tmp_path / "notify.sock"))
    config = write_config(tmp_path / "authd.toml")
    control = ControlClient(socket_path(tmp_path / "run"), timeout=5)
    env = {**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify.sock")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "authd", "run", "--config", str(config)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not _answers(control):
            assert time.monotonic() < deadline, "the control socket never answered"
            time.sleep(0.1)
        for _ in range(20):  # two messages each (RELOADING, READY): twice what the queue holds
            proc.send_signal(signal.SIGHUP)
            time.sleep(0.05)
        assert _answers(control), "the control socket stopped answering"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        proc.kill()
        output = proc.communicate()[0]
        unread.close()
    dropped = [e for e in events(output) if e["event"] == "sd_notify message dropped"]
    assert dropped, "the unread socket never filled up: the test proves nothing"


def _answers(control: ControlClient) -> bool:
    try:
        return bool(list(control.request("status")))
    except ControlError:
        return False


@pytest.mark.parametrize(
    "content",
    [
        bytes(range(256)) * 4,  # garbage bytes: authd exited 1 on every start
        b"",
        b'{"format": 1, "identities": {"spiffe://example.org/a": 2',
        b'{"format": 1, "identities": [], "nodes": {}}',
    ],
    ids=["garbage", "empty", "truncated", "wrong-types"],
)
def test_corrupt_handle_state_gives_fresh_handles_not_a_crash_loop(
    tmp_path: Path, notify: NotifyReceiver, content: bytes
) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    (state / "handles.json").write_bytes(content)
    proc = start_authd(write_config(tmp_path / "authd.toml"), notify)
    try:
        notify.wait_for("READY=1", timeout=30)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        proc.kill()
        output = proc.communicate()[0]
    assert (state / "handles.json.corrupt").read_bytes() == content
    (logged,) = [e for e in events(output) if "identity handle state corrupt" in str(e["event"])]
    assert logged["level"] == "error"
    assert logged["moved_to"] == str(state / "handles.json.corrupt")
