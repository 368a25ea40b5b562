"""Cluster state through a real etcd member (Debian's etcd-server) on loopback.

``cluster.etcd_apply_ms_1000``: from the start of ``authd cluster push``'s transaction of a 1000-endpoint
cluster (100 nodes) to the moment a watching node has applied the new state and computed its desired
maps (10 local x 1000 remote pairs), the input the auth manager writes the auth map from. The map writes
themselves are the datapath suite's figures (``datapath.*``) and are not repeated here: this figure needs
no BPF and runs on any machine. Median of 5 rounds, each moving every remote endpoint to a new address.
"""

from __future__ import annotations

import asyncio
import dataclasses
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


def run() -> Figures:
    """Start one etcd member, measure, stop it."""
    with tempfile.TemporaryDirectory(prefix="authd-bench-etcd-") as directory:
        cluster = EtcdCluster(Path(directory))
        try:
            cluster.start()
            samples = asyncio.run(_apply_rounds(cluster))
        finally:
            cluster.close()
    return {"cluster.etcd_apply_ms_1000": figure(median(samples) * 1000, "ms")}
