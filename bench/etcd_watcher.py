"""One process of the ``cluster.etcd_watchers_100`` benchmark: several etcd sources following one prefix.

Run as ``python -m bench.etcd_watcher ENDPOINT PREFIX COUNT``: prints ``ready`` once every source holds
a state, then reads a revision from stdin and prints ``done`` once every source has applied it.
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


async def follow(endpoint: str, prefix: str, count: int) -> None:
    """Run ``count`` sources until they reach the revision read from stdin."""
    config = dataclasses.replace(EtcdConfig(), endpoints=(endpoint,), prefix=prefix)
    health = Health()
    sources = [
        EtcdClusterSource(
            EtcdClient(config),
            prefix,
            "node-0",
            health.register(f"cluster-{index}"),
            backoff=BackoffPolicy(initial=0.05, maximum=0.5),
        )
        for index in range(count)
    ]
    tasks = [asyncio.create_task(source.run()) for source in sources]
    while not all(source.current() is not None for source in sources):  # noqa: ASYNC110 - polled benchmark
        await asyncio.sleep(0.01)
    print("ready", flush=True)
    target = int(await asyncio.to_thread(sys.stdin.readline))
    while not all(source.revision >= target for source in sources):  # noqa: ASYNC110 - polled benchmark
        await asyncio.sleep(0.01)
    print("done", flush=True)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def main() -> None:
    """Parse the command line and follow."""
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))
    endpoint, prefix, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    asyncio.run(follow(endpoint, prefix, count))


if __name__ == "__main__":
    main()
