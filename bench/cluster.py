"""Cluster state costs: parsing and checking a large file, computing desired state, polling, handles.

These bound the cluster-state share of ``attest.converge_s_*``: a change to the file reaches the auth
manager after at most one poll interval plus the parse and the desired-state computation measured here.
"""

from __future__ import annotations

import tempfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path

from authd.cluster.desired import desired_state
from authd.cluster.file import FileClusterSource, parse_cluster
from authd.cluster.handles import HandleRegistry
from authd.health import Health
from authd.identity import SpiffeId
from bench.figures import Figures, figure, median

NODES = 100
REMOTE_IDENTITIES = 1000
LOCAL_IDENTITIES = 10


def cluster_text(remote: int = REMOTE_IDENTITIES, local: int = LOCAL_IDENTITIES, nodes: int = NODES) -> str:
    """A cluster of ``nodes`` nodes; node-0 hosts ``local`` identities, the others share ``remote``."""
    lines = ['trust_domain = "example.org"']
    for index in range(nodes):
        lines += [
            "[[node]]",
            f'name = "node-{index}"',
            f'addresses = ["192.0.{index // 250}.{index % 250 + 1}"]',
        ]
    for index in range(local):
        lines += _endpoint(f"local/w{index}", "node-0", f"10.0.{index // 250}.{index % 250 + 1}")
    for index in range(remote):
        node = f"node-{index % (nodes - 1) + 1}"
        lines += _endpoint(f"remote/w{index}", node, f"10.1.{index // 250}.{index % 250 + 1}")
    lines += [
        "[[policy]]",
        'source = "spiffe://example.org/remote/*"',
        'destination = "spiffe://example.org/local/*"',
        'enforce = "both"',
    ]
    return "\n".join(lines) + "\n"


def _endpoint(path: str, node: str, address: str) -> list[str]:
    return [
        "[[endpoint]]",
        f'spiffe_id = "spiffe://example.org/{path}"',
        f'node = "{node}"',
        f'prefixes = ["{address}"]',
        f'selectors = ["unix:uid:{zlib.crc32(path.encode()) % 60000}"]',
    ]


def _timed(action: Callable[[], object], repeat: int) -> float:
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        action()
        samples.append(time.perf_counter() - start)
    return median(samples)


def run() -> Figures:
    """Measure; every figure is a median."""
    text = cluster_text()
    state = parse_cluster(text)
    parse_s = _timed(lambda: parse_cluster(text), 5)

    handles = HandleRegistry(None, "node-0")
    handles.assign(state.identities, state.nodes)
    desired = desired_state(state, "node-0", handles)
    assert len(desired.pairs) == LOCAL_IDENTITIES * REMOTE_IDENTITIES
    desired_s = _timed(lambda: desired_state(state, "node-0", handles), 5)

    with tempfile.TemporaryDirectory(prefix="authd-bench-cluster-") as directory:
        path = Path(directory) / "cluster.toml"
        path.write_text(text)
        source = FileClusterSource(
            path, "node-0", Health().register("cluster"), clock=lambda: time.time() + 60
        )
        source.poll()
        poll_s = _timed(source.poll, 1000)

        def assign_fresh() -> None:
            registry = HandleRegistry(Path(directory) / "handles.json", "node-0")
            registry.assign(state.identities, state.nodes)

        assign_s = _timed(assign_fresh, 5)
        one_more = [0]

        def assign_one() -> None:
            one_more[0] += 1
            handles_on_disk.assign([SpiffeId.parse(f"spiffe://example.org/extra/w{one_more[0]}")])

        handles_on_disk = HandleRegistry(Path(directory) / "handles.json", "node-0")
        handles_on_disk.assign(state.identities, state.nodes)
        assign_one_s = _timed(assign_one, 20)

    return {
        "cluster.parse_ms_1000": figure(parse_s * 1000, "ms"),
        "cluster.desired_ms_10x1000": figure(desired_s * 1000, "ms"),
        "cluster.poll_unchanged_us": figure(poll_s * 1e6, "us"),
        "cluster.handles_assign_ms_1000": figure(assign_s * 1000, "ms"),
        "cluster.handles_assign_one_ms": figure(assign_one_s * 1000, "ms"),
    }
