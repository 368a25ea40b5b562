"""authd run as a subprocess inside a test topology's node namespace, with a NOTIFY_SOCKET to wait on."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.notify import NotifyReceiver
from tests.privileged.topology import Topology


class Authd:
    """``authd run`` inside the node's network namespace (nsenter --net keeps /sys/fs/bpf visible)."""

    def __init__(self, topo: Topology, tmp: Path, pin_dir: Path) -> None:
        self.topo = topo
        self.config = tmp / "authd.toml"
        self.config.write_text(
            f'[node]\nname = "node-a"\nstate_dir = "{tmp}/state"\nruntime_dir = "{tmp}/run"\n'
            '[log]\nformat = "json"\n'
            f'[datapath]\npin_dir = "{pin_dir}"\ninterfaces = ["adp{topo.tag}*"]\n'
        )
        self.notify = NotifyReceiver(tmp / "notify.sock")
        self.proc: subprocess.Popen[str] | None = None
        self.outputs: list[str] = []

    def start(self) -> float:
        started = time.monotonic()
        self.proc = subprocess.Popen(
            [
                "nsenter",
                f"--net={self.topo.path(self.topo.node)}",
                sys.executable,
                "-m",
                "authd",
                "run",
                "--config",
                str(self.config),
            ],
            env={**os.environ, "NOTIFY_SOCKET": str(self.notify.path)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.notify.messages.clear()  # a READY=1 from an earlier start must not count
        self.notify.wait_for("READY=1", timeout=30)
        return time.monotonic() - started

    def stop(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        output, _ = self.proc.communicate(timeout=20)
        self.outputs.append(output)
        assert self.proc.returncode == 0, output
        self.proc = None

    def close(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.outputs.append(self.proc.communicate()[0])
        self.notify.close()
