"""One watcher of the ``cluster.etcd_watchers_100`` benchmark: an etcd source following one prefix.

Run as ``python -m bench.etcd_watcher ENDPOINT PREFIX``: prints ``ready`` once the source holds a state,
then reads a state version from stdin and, once that state is in force, prints ``done`` and how many
states the source applied since it was ready; exits after one more line.
"""

from __future__ import annotations

import asyncio
import dataclasses
import sys

import structlog

from authd.backoff import BackoffPolicy
from authd.cluster.etcd import EtcdClient
from authd.cluster.etcdsource import EtcdClusterSource
from authd.config.model import EtcdConfig
from authd.health import Health


async def follow(endpoint: str, prefix: str) -> None:
    """Run a source until the state version read from stdin is in force."""
    config = dataclasses.replace(EtcdConfig(), endpoints=(endpoint,), prefix=prefix)
    source = EtcdClusterSource(
        EtcdClient(config),
        prefix,
        "node-0",
        Health().register("cluster"),
        backoff=BackoffPolicy(initial=0.05, maximum=0.5),
    )
    task = asyncio.create_task(source.run())
    while source.current() is None:  # noqa: ASYNC110 - polled benchmark
        await asyncio.sleep(0.01)
    applied = source.stats.applied
    print("ready", flush=True)
    target = (await asyncio.to_thread(sys.stdin.readline)).strip()
    while source.current().version != target:  # type: ignore[union-attr]  # noqa: ASYNC110
        await asyncio.sleep(0.01)
    print("done", source.stats.applied - applied, flush=True)
    await asyncio.to_thread(sys.stdin.readline)  # stay up while the parent reads our memory
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def main() -> None:
    """Parse the command line and follow."""
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))
    endpoint, prefix = sys.argv[1], sys.argv[2]
    asyncio.run(follow(endpoint, prefix))


if __name__ == "__main__":
    main()
