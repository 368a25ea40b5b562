"""Daemon start-up time to READY=1, and resident memory once idle, against a bare interpreter baseline."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.figures import Figures, figure, median

RUNS = 5


def run() -> Figures:
    """Start ``authd run`` RUNS times under a NOTIFY_SOCKET and time READY=1."""
    startup: list[float] = []
    rss: list[float] = []
    baseline = [_interpreter_startup() for _ in range(RUNS)]
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "authd.toml"
        config.write_text(
            f'[node]\nname = "bench"\nstate_dir = "{tmp}/state"\nruntime_dir = "{tmp}/run"\n'
            '[log]\nlevel = "warning"\nformat = "json"\n[datapath]\nenabled = false\n'
        )
        for index in range(RUNS):
            seconds, kib = _start_once(config, Path(tmp) / f"notify{index}.sock")
            startup.append(seconds)
            rss.append(kib)
    return {
        "daemon.startup_to_ready_ms": figure(median(startup) * 1000, "ms"),
        "daemon.python_baseline_startup_ms": figure(median(baseline) * 1000, "ms"),
        "daemon.idle_rss_mib": figure(median(rss) / 1024, "MiB"),
    }


def _interpreter_startup() -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    return time.perf_counter() - started


def _start_once(config: Path, notify_path: Path) -> tuple[float, int]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(notify_path))
        notify.settimeout(60)
        started = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, "-m", "authd", "run", "--config", str(config)],
            env={**os.environ, "NOTIFY_SOCKET": str(notify_path)},
            stdout=subprocess.DEVNULL,
        )
        try:
            while b"READY=1" not in notify.recv(4096):
                pass
            ready = time.perf_counter() - started
            time.sleep(1.0)  # let start-up garbage settle before reading the idle footprint
            rss = _rss_kib(proc.pid)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
    return ready, rss


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"bench: no VmRSS for pid {pid}")
