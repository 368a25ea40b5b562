"""Cluster state through a real etcd member (Debian's etcd-server) on loopback.

``cluster.etcd_apply_ms_1000``: from the start of the transaction that adds 1000 endpoints (new
identities on 99 other nodes) to a 100-node cluster, to the last of the 10 x 1000 auth entries written in
a real pinned BPF auth map (so it needs root) by a node's auth manager: the etcd source's watch, its
validation, the desired state, the attestations of the 1000 new identities (answered at once by scripted
channels: the node channel's own cost is ``attest.*``) and the map writes. Median of 5 rounds, each
adding 1000 identities never seen before, then removing them again (not timed).

``cluster.etcd_watchers_100.*``: 100 watcher processes, each one etcd source with its own connection
and watch, as 100 authd nodes hold them (the control plane's cluster-state part only: no datapath, no
SPIRE), follow a 100-endpoint cluster while a burst of 1000 changes is written: 1000 Puts, one revision
each, sent as 10 waves of 100 concurrent writers that each move one endpoint. Reported: the burst's wall
time until every watcher has applied the last change; CPU seconds used during it by etcd and by all
watchers together; etcd's RSS after it and the median RSS of one watcher; and the median number of
states a watcher applied for the 1000 changes, which shows the coalescing of watched changes (without
it: 1000).
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc

from authd.attest.results import Attestations
from authd.authmanager import AuthManager
from authd.backoff import BackoffPolicy
from authd.cluster._proto import etcd_pb2 as pb
from authd.cluster.etcd import EtcdClient
from authd.cluster.etcdcodec import decode_state, encode_state
from authd.cluster.etcdsource import EtcdClusterSource, items_under
from authd.cluster.file import parse_cluster
from authd.cluster.handles import HandleRegistry
from authd.config.model import EtcdConfig
from authd.health import Health
from bench.cluster import LOCAL_IDENTITIES, REMOTE_IDENTITIES, cluster_text
from bench.figures import Figures, figure, median
from tests.etcd import EtcdCluster
from tests.fakes.attest import ScriptedChannels
from tests.fakes.authtables import FakeSvids
from tests.fakes.ca import LeafOptions, TestCA

PREFIX = "/bench/"
ROUNDS = 5
WATCH_PREFIX = "/watch/"
WATCHERS = 100
CHANGES = 1000


async def _apply_rounds(cluster: EtcdCluster, pin_dir: Path) -> list[float]:
    from authd.datapath.maps import PinnedMaps  # noqa: PLC0415 - root only
    from authd.datapath.tables import PinnedAuthTable, PinnedTables  # noqa: PLC0415

    config = dataclasses.replace(EtcdConfig(), endpoints=cluster.endpoints, prefix=PREFIX)
    writer = EtcdClient(config)
    source = EtcdClusterSource(
        EtcdClient(config),
        PREFIX,
        "node-0",
        Health().register("cluster"),
        backoff=BackoffPolicy(initial=0.05, maximum=0.5),
    )
    now = dt.datetime.now(dt.UTC)
    ca = TestCA.create(
        "example.org", not_before=now - dt.timedelta(days=1), not_after=now + dt.timedelta(days=2)
    )
    live = LeafOptions(not_before=now - dt.timedelta(minutes=1), not_after=now + dt.timedelta(hours=1))
    base = parse_cluster(cluster_text(remote=0))
    svids = FakeSvids(
        {endpoint.spiffe_id: ca.mint(str(endpoint.spiffe_id), live) for endpoint in base.endpoints}
    )
    handles = HandleRegistry(None, "node-0")
    attestations = Attestations(on_change=lambda peers: manager.attestations_changed(peers))  # noqa: PLW0108 - made below
    channels = ScriptedChannels(attestations)
    await writer.replace(PREFIX.encode(), items_under(PREFIX, encode_state(base)))
    samples = []
    with PinnedMaps(pin_dir) as maps:
        manager = AuthManager(
            node_name="node-0",
            handles=handles,
            table=PinnedAuthTable(maps.auth, handles),
            tables=PinnedTables(maps.ipcache, maps.policy),
            svids=svids,
            attestations=attestations,
            attest_port=4250,
        )
        tasks = [
            asyncio.create_task(source.run()),
            asyncio.create_task(manager.run()),
            asyncio.create_task(_feed(source, manager)),
        ]
        try:
            for round_ in range(1, ROUNDS + 1):
                grown = parse_cluster(cluster_text().replace("/remote/w", f"/remote/r{round_}w"))
                for endpoint in grown.endpoints:
                    if endpoint.node != "node-0":
                        channels.script(
                            str(endpoint.spiffe_id), endpoint.node, ca.mint(str(endpoint.spiffe_id), live)
                        )
                items = items_under(PREFIX, encode_state(grown))
                start = time.perf_counter()
                await writer.replace(PREFIX.encode(), items)
                await _entries(manager, LOCAL_IDENTITIES * REMOTE_IDENTITIES)
                samples.append(time.perf_counter() - start)
                await writer.replace(PREFIX.encode(), items_under(PREFIX, encode_state(base)))
                await _entries(manager, 0)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await writer.close()
    return samples


async def _feed(source: EtcdClusterSource, manager: AuthManager) -> None:
    async for state in source.snapshots():
        manager.cluster_changed(state)


async def _entries(manager: AuthManager, count: int) -> None:
    """Wait until the auth map holds ``count`` entries."""
    async with asyncio.timeout(120):
        while manager.stats.entries != count:  # noqa: ASYNC110 - the manager offers no event for it
            await asyncio.sleep(0.001)


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
            [sys.executable, "-m", "bench.etcd_watcher", cluster.endpoints[0], WATCH_PREFIX],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(WATCHERS)
    ]
    etcd_pid = cluster.members[0].process.pid  # type: ignore[union-attr]
    try:
        for watcher in watchers:
            assert await asyncio.to_thread(watcher.stdout.readline) == "ready\n"  # type: ignore[union-attr]
        pids = [watcher.pid for watcher in watchers]
        etcd_before, watchers_before = _cpu_seconds(etcd_pid), sum(_cpu_seconds(pid) for pid in pids)
        start = time.perf_counter()
        current = dict(items)
        async with grpc.aio.insecure_channel(cluster.endpoints[0].partition("://")[2]) as channel:
            put = channel.unary_unary(
                "/etcdserverpb.KV/Put",
                request_serializer=pb.PutRequest.SerializeToString,
                response_deserializer=pb.PutResponse.FromString,
            )
            for wave in range(CHANGES // len(endpoint_keys)):
                for index, key in enumerate(endpoint_keys):
                    current[key] = _moved(items[key], wave * len(endpoint_keys) + index)
                await asyncio.gather(
                    *(
                        put(pb.PutRequest(key=(WATCH_PREFIX + key).encode(), value=current[key]))
                        for key in endpoint_keys
                    )
                )
        final = decode_state(current, origin="bench").version
        for watcher in watchers:
            watcher.stdin.write(f"{final}\n")  # type: ignore[union-attr]
            watcher.stdin.flush()  # type: ignore[union-attr]
        applied = []
        for watcher in watchers:
            done, count = (await asyncio.to_thread(watcher.stdout.readline)).split()  # type: ignore[union-attr]
            assert done == "done"
            applied.append(float(count))
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
        f"{name}.states_applied_per_watcher": figure(median(applied), "states"),
    }


def _moved(value: bytes, change: int) -> bytes:
    """The endpoint's value with its address moved to one no other change uses."""
    old = value.split(b'"prefixes":["', 1)[1].split(b'"', 1)[0]
    return value.replace(old, f"10.{100 + change // 250}.{change % 250}.1".encode(), 1)


def run() -> Figures:
    """Start one etcd member, measure, stop it; the apply figure needs root (real BPF maps)."""
    figures: Figures = {}
    with tempfile.TemporaryDirectory(prefix="authd-bench-etcd-") as directory:
        cluster = EtcdCluster(Path(directory))
        try:
            cluster.start()
            if os.geteuid() == 0:
                figures["cluster.etcd_apply_ms_1000"] = figure(median(_applied(cluster)) * 1000, "ms")
            else:
                print("bench: cluster.etcd_apply_ms_1000 needs root (real BPF maps); skipped")
            figures.update(asyncio.run(_burst(cluster)))
        finally:
            cluster.close()
    return figures


def _applied(cluster: EtcdCluster) -> list[float]:
    from authd.datapath.loader import Datapath, MapSizes, remove_pins  # noqa: PLC0415 - root only

    pin_dir = Path(f"/sys/fs/bpf/aeb-bench-{secrets.token_hex(3)}")
    sizes = MapSizes(ipcache=4096, policy=1 << 16, auth=1 << 16, events_bytes=1 << 20, flows=4096)
    datapath = Datapath.load(pin_dir, sizes)
    try:
        return asyncio.run(_apply_rounds(cluster, pin_dir))
    finally:
        datapath.close()
        remove_pins(pin_dir)
        shutil.rmtree(pin_dir, ignore_errors=True)
