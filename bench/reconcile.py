"""Full reconciles at scale: how long the auth manager stalls the event loop with 200k auth entries.

``attest.reconcile_block_ms_200k`` is the longest stall of the event loop while the auth manager runs
full reconciles over 448 x 448 = 200,704 auth entries in *real* pinned BPF maps (so it needs root): the
first one (desired state computed, every entry written) and then :data:`ROUNDS` more with nothing
changed but a wake-up (the map read whole, every pair compared). A probe task sleeps 1 ms in a loop and
records by how much each wake-up came late; the figure is the largest lateness over all reconciles.
``attest.reconcile_s_200k`` is the median duration of the unchanged reconciles.

All 448 identities run on this node and policy pairs each with every one, so no attestation is
involved: only the manager's own work is measured.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import secrets
import shutil
import time
from pathlib import Path

from authd import log
from authd.attest.results import Attestations
from authd.authmanager import AuthManager
from authd.cluster.handles import HandleRegistry
from authd.identity import SpiffeId
from bench.figures import Figures, figure, median
from tests.fakes.attest import ScriptedChannels
from tests.fakes.authtables import FakeSvids
from tests.fakes.ca import LeafOptions, TestCA
from tests.fakes.cluster import endpoint, node, rule, state

IDENTITIES = 448  # 448 * 448 = 200,704 entries
ROUNDS = 3
PROBE_S = 0.001


def run() -> Figures:
    """Measure in a loaded datapath with its own pins (root only)."""
    if os.geteuid() != 0:
        print("bench: reconcile needs root (real BPF maps); skipped")
        return {}
    from authd.datapath.loader import Datapath, MapSizes, remove_pins  # noqa: PLC0415 - root only

    log.configure("warning", "console")
    pin_dir = Path(f"/sys/fs/bpf/arc-bench-{secrets.token_hex(3)}")
    sizes = MapSizes(ipcache=4096, policy=1 << 18, auth=1 << 18, events_bytes=1 << 20, flows=4096)
    datapath = Datapath.load(pin_dir, sizes)
    try:
        return asyncio.run(_measure(pin_dir))
    finally:
        datapath.close()
        remove_pins(pin_dir)
        shutil.rmtree(pin_dir, ignore_errors=True)


class _LagProbe:
    """Sleeps PROBE_S at a time and keeps the largest lateness of a wake-up while ``armed``."""

    def __init__(self) -> None:
        self.armed = False
        self.worst = 0.0

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            before = loop.time()
            await asyncio.sleep(PROBE_S)
            late = loop.time() - before - PROBE_S
            if self.armed:
                self.worst = max(self.worst, late)


async def _measure(pin_dir: Path) -> Figures:
    from authd.datapath.maps import PinnedMaps  # noqa: PLC0415 - root only
    from authd.datapath.tables import PinnedAuthTable, PinnedTables  # noqa: PLC0415

    now = dt.datetime.now(dt.UTC)
    ca = TestCA.create(
        "example.org", not_before=now - dt.timedelta(days=1), not_after=now + dt.timedelta(days=2)
    )
    live = LeafOptions(not_before=now - dt.timedelta(minutes=1), not_after=now + dt.timedelta(hours=1))
    paths = [f"w{i}" for i in range(IDENTITIES)]
    svids = FakeSvids(
        {
            SpiffeId.parse(f"spiffe://example.org/{p}"): ca.mint(f"spiffe://example.org/{p}", live)
            for p in paths
        }
    )
    endpoints = [endpoint(p, "node-a", f"10.{i // 250}.{i % 250}.1/32") for i, p in enumerate(paths)]
    cluster = state([node("node-a")], endpoints, [rule("spiffe://example.org/*", "spiffe://example.org/*")])
    handles = HandleRegistry(None, "node-a")
    attestations = Attestations(on_change=lambda _peers: None)
    ScriptedChannels(attestations)  # all identities are local: nothing is ever asked of a peer
    probe = _LagProbe()
    with PinnedMaps(pin_dir) as maps:
        manager = AuthManager(
            node_name="node-a",
            handles=handles,
            table=PinnedAuthTable(maps.auth, handles),
            tables=PinnedTables(maps.ipcache, maps.policy),
            svids=svids,
            attestations=attestations,
            attest_port=4250,
        )
        tasks = [asyncio.create_task(probe.run()), asyncio.create_task(manager.run())]
        try:
            durations = []
            probe.armed = True
            manager.cluster_changed(cluster)  # the first: desired state, every entry written
            await _reconciled(manager, 1)
            assert manager.stats.entries == IDENTITIES * IDENTITIES, manager.stats.entries
            for round_ in range(ROUNDS):
                started = time.monotonic()
                manager.svids_changed()
                await _reconciled(manager, round_ + 2)
                durations.append(time.monotonic() - started)
            probe.armed = False
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
    return {
        "attest.reconcile_block_ms_200k": figure(probe.worst * 1000, "ms"),
        "attest.reconcile_s_200k": figure(median(durations), "s"),
    }


async def _reconciled(manager: AuthManager, count: int) -> None:
    """Wait, without a busy loop that would itself stall, until ``count`` full reconciles ran."""
    async with asyncio.timeout(300):
        while manager.stats.reconciles < count:  # noqa: ASYNC110 - the manager offers no event for it
            await asyncio.sleep(0.01)
