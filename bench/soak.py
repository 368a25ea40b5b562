"""Soak: memory and file descriptors of two ``authd run`` processes across many SVID rotations.

Two nodes on loopback (node-a on 127.0.0.1, node-b on 127.0.0.2), each with WORKLOADS workloads that
require authentication to and from every other, against ``authd dev-spire`` with TTL-second SVIDs: every
SVID rotates at half-life, so node-a applies a local rotation and attests a rotated remote identity
WORKLOADS times per half-life each. The datapath is loaded (pins in the root namespace, attached to no
interface), so the auth manager writes every rotation into the auth map as in production.

- ``soak.rss_slope_kib_per_1000_rotations``: node-a's RSS growth per 1000 rotations (local SVID updates
  plus successful attestations, read from its /metrics) over ROTATIONS rotations after WARMUP_ROTATIONS;
  goal under 1024 (flat). RSS is a sawtooth: it climbs about 2 MiB as garbage collects and falls back
  when it is freed, every 750 rotations or so here, so a straight line fitted through every sample
  reports whichever phase the window happened to end in. The trend is read from the lows instead: the
  lowest RSS of the last third of the samples minus the lowest of the first third, per rotation between
  the two thirds' middles; each third spans more than one period. The lows also rise by about 2 MiB over
  the first 2000 rotations and then stay level (one run of 4400 rotations, lows in MiB at 760, 1540,
  2310, 2980 and 3750 rotations: 94.3, 95.3, 96.1, 95.5, 95.4): the allocator's arenas and the caches
  settling. The warm-up keeps most of that settling out of the figure, which is about the months after.
  ``soak.rss_start_mib``: its RSS when measuring starts. ``soak.fds_delta``: its open file descriptors at
  the end minus at the start; goal 0.

Needs root (BPF pins); prints a note and returns nothing otherwise. Run alone:
``flock /tmp/authd-tests.lock .venv/bin/python -m bench --only soak --output build/soak.json``.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from bench.figures import Figures, figure

WORKLOADS = 10
TTL = 4.0
WARMUP = 20.0  # seconds: start-up and the first attestations
WARMUP_ROTATIONS = 1000
ROTATIONS = 3000  # over a period of the sawtooth in each third
SAMPLE_EVERY = 2.0
TIMEOUT = 900.0
NODES = {"node-a": "127.0.0.1", "node-b": "127.0.0.2"}


def run() -> Figures:
    """Run the two-node soak and read node-a's figures."""
    if os.geteuid() != 0:
        print("bench: soak needs root; skipped")
        return {}
    directory = Path(tempfile.mkdtemp(prefix="asoak"))  # short: Unix socket paths stay under 108 bytes
    processes: list[subprocess.Popen[bytes]] = []
    try:
        http_port = _write_files(directory)
        processes.append(_start(directory, "dev-spire", _dev_spire_argv(directory)))
        for node in NODES:
            argv = ["run", "--config", str(directory / node / "authd.toml")]
            processes.append(_start(directory, node, argv))
        return _measure(processes[1].pid, f"http://127.0.0.1:{http_port}/metrics")
    finally:
        for proc in reversed(processes):
            proc.send_signal(signal.SIGTERM)
        for proc in reversed(processes):
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for node in NODES:
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "authd",
                    "bpf",
                    "unload",
                    "--config",
                    str(directory / node / "authd.toml"),
                ],
                check=False,
                capture_output=True,
            )
        shutil.rmtree(directory, ignore_errors=True)


def _measure(pid: int, metrics_url: str) -> Figures:
    deadline = time.monotonic() + TIMEOUT
    time.sleep(WARMUP)
    while _rotations(metrics_url) < WARMUP_ROTATIONS:
        if time.monotonic() > deadline:
            raise RuntimeError(f"bench: soak warm-up did not reach {WARMUP_ROTATIONS} rotations in time")
        time.sleep(SAMPLE_EVERY)
    start_rotations = _rotations(metrics_url)
    start_fds = _fds(pid)
    samples: list[tuple[float, float]] = []
    while True:
        rotations = _rotations(metrics_url) - start_rotations
        samples.append((rotations, _rss_kib(pid)))
        if rotations >= ROTATIONS and len(samples) >= 10:
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"bench: soak reached {rotations} of {ROTATIONS} rotations in time")
        time.sleep(SAMPLE_EVERY)
    fds_delta = _fds(pid) - start_fds
    return {
        "soak.rss_slope_kib_per_1000_rotations": figure(
            _slope(samples) * 1000, f"KiB per 1000 rotations (over {int(samples[-1][0])})"
        ),
        "soak.rss_start_mib": figure(samples[0][1] / 1024, "MiB"),
        "soak.fds_delta": figure(fds_delta, "fds"),
    }


def _slope(samples: list[tuple[float, float]]) -> float:
    """RSS growth (KiB) per rotation between the lows of the first and the last third of the samples."""
    third = len(samples) // 3
    first, last = samples[:third], samples[-third:]
    rise = min(y for _, y in last) - min(y for _, y in first)
    return rise / (sum(x for x, _ in last) / third - sum(x for x, _ in first) / third)


def _rotations(metrics_url: str) -> float:
    """Local SVID updates applied plus attestations of new leaves (first or rotated), from /metrics."""
    with urllib.request.urlopen(metrics_url, timeout=5) as response:  # noqa: S310 - loopback URL we built
        text = response.read().decode()
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if (
                sample.name == "authd_spire_updates_applied_total"
                and sample.labels.get("source") == "delegated-identity-api"
            ):
                total += sample.value
            # A remote rotation is attested as "rotated" (the first proof of a peer is "ok").
            if sample.name == "authd_attestations_total" and sample.labels.get("result") in {
                "ok",
                "rotated",
            }:
                total += sample.value
    return total


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"bench: no VmRSS for pid {pid}")


def _fds(pid: int) -> int:
    return sum(1 for _ in Path(f"/proc/{pid}/fd").iterdir())


def _free_port(address: str) -> int:
    with socket.socket() as sock:
        sock.bind((address, 0))
        return int(sock.getsockname()[1])


def _start(directory: Path, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
    with (directory / f"{name}.log").open("wb") as log:
        return subprocess.Popen([sys.executable, "-m", "authd", *argv], stdout=log, stderr=subprocess.STDOUT)


def _dev_spire_argv(directory: Path) -> list[str]:
    argv = ["dev-spire", "--dir", str(directory / "spire"), "--trust-domain", "example.org"]
    argv += ["--entries", str(directory / "entries.toml"), "--svid-ttl", str(TTL), "--log-format", "json"]
    for node in NODES:
        argv += ["--node", node, "--authorized-delegate", f"spiffe://example.org/authd/{node}"]
    return argv


def _write_files(directory: Path) -> int:
    """SPIRE entries, the cluster file and both configs; return node-a's HTTP port."""
    entries: list[str] = []
    cluster = ['trust_domain = "example.org"', ""]
    ports = {node: _free_port(address) for node, address in NODES.items()}
    for node, address in NODES.items():
        entries += ["[[entry]]", f'spiffe_id = "spiffe://example.org/authd/{node}"', f'node = "{node}"']
        entries += ['selectors = ["unix:uid:0"]', ""]
        cluster += [
            "[[node]]",
            f'name = "{node}"',
            f'addresses = ["{address}"]',
            f"attest_port = {ports[node]}",
            "",
        ]
    for index, node in enumerate(NODES):
        for workload in range(WORKLOADS):
            uid = 20000 + index * 1000 + workload
            spiffe_id = f"spiffe://example.org/{node}/w{workload}"
            selector = f'selectors = ["unix:uid:{uid}"]'
            entries += ["[[entry]]", f'spiffe_id = "{spiffe_id}"', f'node = "{node}"', selector, ""]
            prefix = f"10.{index + 1}.0.{workload + 1}/32"
            cluster += ["[[endpoint]]", f'spiffe_id = "{spiffe_id}"', f'node = "{node}"']
            cluster += [f'prefixes = ["{prefix}"]', selector, ""]
    cluster += ["[[policy]]", 'source = "*"', 'destination = "*"', 'enforce = "both"', ""]
    (directory / "entries.toml").write_text("\n".join(entries))
    (directory / "cluster.toml").write_text("\n".join(cluster))
    http_port = _free_port("127.0.0.1")
    for node, address in NODES.items():
        node_dir = directory / node
        node_dir.mkdir()
        spire = directory / "spire" / node
        http = f"port = {http_port}\n" if node == "node-a" else "enabled = false\n"
        (node_dir / "authd.toml").write_text(
            f'[node]\nname = "{node}"\nstate_dir = "{node_dir}/state"\nruntime_dir = "{node_dir}/run"\n'
            '[log]\nlevel = "warning"\nformat = "json"\n'
            f'[spire]\nworkload_socket = "{spire}/public/api.sock"\n'
            f'admin_socket = "{spire}/private/admin.sock"\n'
            'reconnect_backoff_initial = "100ms"\nreconnect_backoff_max = "2s"\n'
            f'[cluster]\nfile = "{directory}/cluster.toml"\n'
            f'[attest]\nlisten_address = "{address}"\nport = {ports[node]}\n'
            'retry_initial = "200ms"\nretry_max = "2s"\n'
            f'[datapath]\npin_dir = "/sys/fs/bpf/{directory.name}-{node}"\ninterfaces = ["asoaknone*"]\n'
            f"[http]\n{http}"
        )
    return http_port
