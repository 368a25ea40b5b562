"""Scraping ``/metrics`` over HTTP from a daemon-sized view, the way Prometheus does.

``http.metrics_scrape_ms`` is the median time of one GET /metrics on loopback against the real aiohttp
server and collector, with 500 attested peers, 200 workload SVIDs and the datapath counters: what a
scrape costs the daemon's event loop. ``http.metrics_bytes`` is the size of that answer.
"""

from __future__ import annotations

import asyncio
import time

import aiohttp

from authd.attest.results import Attestation, Peer, PeerStatus
from authd.config.model import HttpConfig
from authd.httpapi import HttpServer
from authd.identity import SpiffeId
from bench.figures import Figures, figure, median
from tests.fakes.ca import NOW, TestCA
from tests.fakes.daemonview import build

SCRAPES = 60
PEERS = 500
WORKLOADS = 200


async def _scrape() -> tuple[list[float], int]:
    ca = TestCA.create("example.org")
    view, parts = build(ca)
    leaf = ca.mint("spiffe://example.org/ns/bench/sa/remote")
    for n in range(WORKLOADS):
        spiffe_id = SpiffeId.parse(f"spiffe://example.org/ns/bench/sa/w{n}")
        parts.store.set_local(spiffe_id, ca.mint(str(spiffe_id)))
    for n in range(PEERS):
        remote = SpiffeId.parse(f"spiffe://example.org/ns/bench/sa/r{n}")
        result = Attestation(remote, f"node-{n % 50}", "10.0.0.1", leaf.chain, NOW)
        parts.results.statuses.append(
            PeerStatus(
                Peer(remote, f"node-{n % 50}"), result, refused=False, last_failure="", in_flight=False
            )
        )
    server = HttpServer(HttpConfig(port=0), view)
    task = asyncio.create_task(server.run())
    try:
        while server.bound is None:  # noqa: ASYNC110 - the server offers no event to wait on
            await asyncio.sleep(0.01)
        host, port = server.bound
        url = f"http://{host}:{port}/metrics"
        samples: list[float] = []
        size = 0
        async with aiohttp.ClientSession() as session:
            for _ in range(SCRAPES):
                started = time.perf_counter()
                async with session.get(url) as response:
                    size = len(await response.read())
                samples.append((time.perf_counter() - started) * 1000)
        return samples, size
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def run() -> Figures:
    """Scrape repeatedly and report the median."""
    samples, size = asyncio.run(_scrape())
    return {
        "http.metrics_scrape_ms": figure(median(samples[5:]), "ms"),
        "http.metrics_bytes": figure(size, "bytes"),
    }
