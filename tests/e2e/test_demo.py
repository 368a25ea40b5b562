"""``make demo`` as a newcomer runs it: it tells its story and exits 0; Ctrl-C or SIGTERM tear it down;
after a crash (SIGKILL), the next run removes what it left.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from authd.devcluster import leftovers
from authd.devcluster.cluster import ClusterSpec, DevCluster, WorkloadSpec

pytestmark = [pytest.mark.privileged, pytest.mark.e2e]

PREFIX = "ae2"
DEMO = [sys.executable, "-m", "authd.devcluster.demo", "--prefix", PREFIX, "--svid-ttl", "8"]
BUILT = "1. A registered pair"  # the first heading after the cluster is up


def test_demo_tells_its_story_and_exits_0() -> None:
    started = time.monotonic()
    result = subprocess.run(DEMO, capture_output=True, text=True, timeout=120, check=False)
    elapsed = time.monotonic() - started

    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert "[FAILED]" not in out
    assert "INGRESS ALLOWED (TCP Flags: SYN; Auth: SPIRE)" in out
    assert "Authentication required DROPPED (TCP Flags: SYN; Auth: SPIRE)" in out
    assert "[ok] drops for pre-registered pairs: 0" in out
    assert "[ok] TCP retransmissions: 0" in out
    assert "[ok] nothing left behind" in out
    assert "[ok] one channel for the node pair, and no other channel" in out
    assert elapsed < 120
    assert not leftovers.remaining(PREFIX)


def lines_until(proc: subprocess.Popen[str], marker: str, timeout: float = 60.0) -> Iterator[str]:
    """Read the demo's output until ``marker`` (the cluster is up by then)."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 1.0)
        if ready:
            line = proc.stdout.readline()
            if not line:
                break
            yield line
            if marker in line:
                return
    pytest.fail(f"the demo did not print {marker!r} within {timeout} s")


def start_demo() -> subprocess.Popen[str]:
    proc = subprocess.Popen(DEMO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for _ in lines_until(proc, BUILT):
            pass
    except BaseException:
        proc.kill()
        proc.communicate()
        leftovers.sweep(PREFIX)
        raise
    assert leftovers.remaining(PREFIX)  # the cluster is up: processes, namespaces, pins, its directory
    return proc


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_stopped_demo_tears_everything_down(sig: signal.Signals) -> None:
    proc = start_demo()

    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=60)

    assert proc.returncode == 130, out
    assert "the cluster was torn down" in out
    assert not leftovers.remaining(PREFIX)


def test_the_run_after_a_crash_removes_what_the_crashed_one_left() -> None:
    proc = start_demo()
    os.kill(proc.pid, signal.SIGKILL)  # no teardown: dev-spire, authd and the workloads keep running
    proc.communicate()
    left = leftovers.remaining(PREFIX)
    assert any(item.startswith("process") for item in left), left
    assert any(item.startswith("netns") for item in left), left

    spec = ClusterSpec(workloads=(WorkloadSpec("solo", "node-a", 2301),), prefix=PREFIX)
    crashed = {item for item in left if item.startswith(("process", leftovers.workdir_prefix(PREFIX)))}
    with DevCluster(spec) as cluster:
        # Namespaces and pins have the same names again; the crashed run's processes and directory are gone.
        assert not crashed & set(leftovers.remaining(PREFIX))
        assert cluster.workdir.exists()

    assert not leftovers.remaining(PREFIX)
