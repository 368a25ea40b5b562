"""Cluster state through a real etcd member (Debian's etcd-server) on loopback.

``cluster.etcd_apply_ms_1000``: from the start of ``authd cluster push``'s transaction of a 1000-endpoint
cluster (100 nodes) to the moment a watching node has applied the new state and computed its desired
maps (10 local x 1000 remote pairs), the input the auth manager writes the auth map from. The map writes
themselves are the datapath suite's figures (``datapath.*``) and are not repeated here: this figure needs
no BPF and runs on any machine. Median of 5 rounds, each moving every remote endpoint to a new address.

``cluster.etcd_watchers_100.*``: 100 etcd sources (each its own connection and watch, as 100 authd nodes
would hold) follow a 100-endpoint cluster while 1000 changes are written one key at a time, as fast as
one writer can. On 2 cores 100 Python interpreters would measure the scheduler, not authd, so the 100
watchers run as 10 processes of 10 sources each: etcd sees 100 watch streams either way, and the
per-watcher CPU and memory are the totals divided by 100. Reported: the burst's wall time until every
watcher has applied the last change; CPU seconds used during it by etcd and by all watchers; etcd's RSS
after it and the watchers' RSS per process.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from authd.backoff import BackoffPolicy
from authd.cluster.desired import desired_state
from authd.cluster.etcd import EtcdClient
from authd.cluster.etcdcodec import encode_state
from authd.cluster.etcdsource import EtcdClusterSource, items_under
from authd.cluster.file import parse_cluster
from authd.cluster.handles import HandleRegistry
from authd.config.model import EtcdConfig
from authd.health import Health
from bench.cluster import LOCAL_IDENTITIES, REMOTE_IDENTITIES, cluster_text
from bench.figures import Figures, figure, median
from tests.etcd import EtcdCluster

PREFIX = "/bench/"
ROUNDS = 5
WATCH_PREFIX = "/watch/"
WATCHER_PROCESSES = 10
WATCHERS_PER_PROCESS = 10
CHANGES = 1000


async def _apply_rounds(cluster: EtcdCluster) -> list[float]:
    config = dataclasses.replace(EtcdConfig(), endpoints=cluster.endpoints, prefix=PREFIX)
    writer = EtcdClient(config)
    source = EtcdClusterSource(
        EtcdClient(config),
        PREFIX,
        "node-0",
        Health().register("cluster"),
        backoff=BackoffPolicy(initial=0.05, maximum=0.5),
    )
    text = cluster_text()
    first = parse_cluster(text)
    handles = HandleRegistry(None, "node-0")
    handles.assign(first.identities, first.nodes)
    await writer.replace(PREFIX.encode(), items_under(PREFIX, encode_state(first)))
    follower = asyncio.create_task(source.run())
    samples = []
    try:
        async for state in source.snapshots():
            if state == first:
                break
        for round_ in range(1, ROUNDS + 1):
            moved = parse_cluster(text.replace('prefixes = ["10.1.', f'prefixes = ["10.{round_ + 1}.'))
            items = items_under(PREFIX, encode_state(moved))
            start = time.perf_counter()
            await writer.replace(PREFIX.encode(), items)
            async for state in source.snapshots():
                if state == moved:
                    break
            desired = desired_state(state, "node-0", handles)
            samples.append(time.perf_counter() - start)
            assert len(desired.pairs) == LOCAL_IDENTITIES * REMOTE_IDENTITIES
    finally:
        follower.cancel()
        await asyncio.gather(follower, return_exceptions=True)
        await writer.close()
    return samples


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def _burst(cluster: EtcdCluster) -> Figures:
    config = dataclasses.replace(EtcdConfig(), endpoints=cluster.endpoints, prefix=WATCH_PREFIX)
    writer = EtcdClient(config)
    state = parse_cluster(cluster_text(remote=100, local=0, nodes=10))
    items = encode_state(state)
    await writer.replace(WATCH_PREFIX.encode(), items_under(WATCH_PREFIX, items))
    endpoint_keys = sorted(key for key in items if key.startswith("v1/endpoint/"))
    watchers = [
        subprocess.Popen(  # noqa: ASYNC220 - started once, before the measurement
            [
                sys.executable,
                "-m",
                "bench.etcd_watcher",
                cluster.endpoints[0],
                WATCH_PREFIX,
                str(WATCHERS_PER_PROCESS),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(WATCHER_PROCESSES)
    ]
    etcd_pid = cluster.members[0].process.pid  # type: ignore[union-attr]
    try:
        for watcher in watchers:
            assert await asyncio.to_thread(watcher.stdout.readline) == "ready\n"  # type: ignore[union-attr]
        pids = [watcher.pid for watcher in watchers]
        etcd_before, watchers_before = _cpu_seconds(etcd_pid), sum(_cpu_seconds(pid) for pid in pids)
        start = time.perf_counter()
        revision = 0
        for change in range(CHANGES):
            key = endpoint_keys[change % len(endpoint_keys)]
            revision = await writer.put((WATCH_PREFIX + key).encode(), _moved(items[key], change))
        for watcher in watchers:
            watcher.stdin.write(f"{revision}\n")  # type: ignore[union-attr]
            watcher.stdin.flush()  # type: ignore[union-attr]
        for watcher in watchers:
            assert await asyncio.to_thread(watcher.stdout.readline) == "done\n"  # type: ignore[union-attr]
        burst_s = time.perf_counter() - start
        etcd_cpu = _cpu_seconds(etcd_pid) - etcd_before
        watchers_cpu = sum(_cpu_seconds(pid) for pid in pids) - watchers_before
        etcd_rss = _rss_mib(etcd_pid)
        watcher_rss = median([_rss_mib(pid) for pid in pids])
    finally:
        for watcher in watchers:
            watcher.kill()
            watcher.wait()
        await writer.close()
    name = "cluster.etcd_watchers_100"
    return {
        f"{name}.burst_s": figure(burst_s, "s"),
        f"{name}.etcd_cpu_s": figure(etcd_cpu, "s"),
        f"{name}.etcd_rss_mib": figure(etcd_rss, "MiB"),
        f"{name}.authd_cpu_s_total": figure(watchers_cpu, "s"),
        f"{name}.authd_rss_mib_per_process": figure(watcher_rss, "MiB"),
    }


def _moved(value: bytes, change: int) -> bytes:
    """The endpoint's value with its address moved to one no other change uses."""
    old = value.split(b'"prefixes":["', 1)[1].split(b'"', 1)[0]
    return value.replace(old, f"10.{100 + change // 250}.{change % 250}.1".encode(), 1)


def run() -> Figures:
    """Start one etcd member, measure, stop it."""
    with tempfile.TemporaryDirectory(prefix="authd-bench-etcd-") as directory:
        cluster = EtcdCluster(Path(directory))
        try:
            cluster.start()
            samples = asyncio.run(_apply_rounds(cluster))
            figures = asyncio.run(_burst(cluster))
        finally:
            cluster.close()
    return {"cluster.etcd_apply_ms_1000": figure(median(samples) * 1000, "ms"), **figures}
