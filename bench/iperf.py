"""iperf3 between network namespaces: a server that lives for one block, and one client run's throughput."""

from __future__ import annotations

import contextlib
import json
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

PORT = 5201
SECONDS = 2
START_TIMEOUT = 5.0


@contextlib.contextmanager
def server(netns: Path, address: str | None = None) -> Iterator[None]:
    """An iperf3 server in ``netns``, on ``address`` (else on every address), until the block ends.

    The block starts once the server says it listens.
    """
    bind = ["-B", address] if address is not None else []
    with tempfile.NamedTemporaryFile("r") as out:
        process = subprocess.Popen(
            ["nsenter", f"--net={netns}", "iperf3", "-s", *bind, "-p", str(PORT), "--forceflush"],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + START_TIMEOUT
            while "listening" not in Path(out.name).read_text():
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"bench: iperf3 server in {netns} did not start: {out.read()[:200]}")
                time.sleep(0.02)
            yield
        finally:
            process.terminate()
            process.wait()


def throughput(netns: Path, to: str, *, source: str | None = None) -> float:
    """Bits per second the server at ``to`` received from one SECONDS-long TCP run out of ``netns``.

    ``source`` binds the client to that address (a workload address, so the tunnel accepts the packets).
    """
    bind = ["-B", source] if source is not None else []
    result = subprocess.run(
        ["nsenter", f"--net={netns}", "iperf3", "-c", to, *bind, "-p", str(PORT), "-t", str(SECONDS), "-J"],
        check=True,
        capture_output=True,
        text=True,
    )
    return float(json.loads(result.stdout)["end"]["sum_received"]["bits_per_second"])
