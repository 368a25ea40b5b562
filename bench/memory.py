"""Resident memory of the daemon's state at scale: 10k local and 10k remote identities, 100k auth entries.

A fresh interpreter imports everything ``authd run`` loads with every feature on (datapath, HTTP and
Hubble), and its RSS then is ``daemon.rss_mib_imports``, the baseline. It then builds the state a node
holds at that scale, with the daemon's own components: LOCAL workload SVIDs in the SVID store (parsed
from DER as the Delegated Identity API delivers them), a handle for every identity, cluster state with
every endpoint, an attestation result for each of REMOTE identities on another node (its chain parsed
from DER as a proof carries it), and the auth manager with 100k entries in a *real* pinned auth map
(root only): every local identity is paired by policy with PAIRED remote identities. Once the manager
has written every entry, the RSS is ``daemon.rss_mib_10k_identities`` (goal: under 80 MiB).

Run alone: ``flock /tmp/authd-tests.lock .venv/bin/python -m bench --only memory --output build/mem.json``.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import gc
import json
import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from bench.figures import Figures, figure

LOCAL = 10_000
REMOTE = 10_000
PAIRED = 10  # remote identities each local identity is paired with: LOCAL * PAIRED auth entries
GROUP = 10  # identities per policy group: one rule pairs a local group with a remote group

if TYPE_CHECKING:
    from authd.attest.results import Peer, Target


def run() -> Figures:
    """Measure in a child interpreter, so that nothing of the other suites is counted (root only)."""
    if os.geteuid() != 0:
        print("bench: memory needs root (real BPF maps); skipped")
        return {}
    child = subprocess.run(
        [sys.executable, "-c", "from bench.memory import child; child()"],
        check=True,
        capture_output=True,
        text=True,
    )
    readings = json.loads(child.stdout.splitlines()[-1])
    return {
        "daemon.rss_mib_imports": figure(readings["imports"] / 1024, "MiB"),
        "daemon.rss_mib_10k_identities": figure(readings["loaded"] / 1024, "MiB"),
    }


def child() -> None:
    """Import what ``authd run`` imports, read RSS, build the state, read RSS again; print both."""
    import authd.daemon  # noqa: PLC0415 - the import is what is measured
    import authd.datapath.enforcement  # noqa: PLC0415
    import authd.httpapi  # noqa: PLC0415
    import authd.hubble.server  # noqa: F401, PLC0415

    gc.collect()
    imports = _rss_kib()
    from authd import log  # noqa: PLC0415 - after the baseline reading
    from authd.datapath.loader import Datapath, MapSizes, remove_pins  # noqa: PLC0415

    log.configure("warning", "console")
    pin_dir = Path(f"/sys/fs/bpf/amem-bench-{secrets.token_hex(3)}")
    sizes = MapSizes(ipcache=1 << 15, policy=1 << 18, auth=1 << 17, events_bytes=1 << 20, flows=4096)
    datapath = Datapath.load(pin_dir, sizes)
    try:
        loaded = asyncio.run(_build(pin_dir))
    finally:
        datapath.close()
        remove_pins(pin_dir)
        shutil.rmtree(pin_dir, ignore_errors=True)
    print(json.dumps({"imports": imports, "loaded": loaded}))


async def _build(pin_dir: Path) -> int:
    from cryptography import x509  # noqa: PLC0415
    from cryptography.hazmat.primitives import serialization  # noqa: PLC0415

    from authd.attest.results import Attestation, Attestations  # noqa: PLC0415
    from authd.authmanager import AuthManager  # noqa: PLC0415
    from authd.cluster.handles import HandleRegistry  # noqa: PLC0415
    from authd.datapath.maps import PinnedMaps  # noqa: PLC0415
    from authd.datapath.tables import PinnedAuthTable, PinnedTables  # noqa: PLC0415
    from authd.svids import BundleOrigin, SvidStore  # noqa: PLC0415
    from authd.x509svid import parse_svid  # noqa: PLC0415
    from tests.fakes.ca import LeafOptions, TestCA  # noqa: PLC0415
    from tests.fakes.cluster import endpoint, node, rule, sid, state  # noqa: PLC0415

    now = dt.datetime.now(dt.UTC)
    ca = TestCA.create(
        "example.org", not_before=now - dt.timedelta(days=1), not_after=now + dt.timedelta(days=2)
    )
    live = LeafOptions(not_before=now - dt.timedelta(minutes=1), not_after=now + dt.timedelta(hours=1))
    der, pkcs8 = serialization.Encoding.DER, serialization.PrivateFormat.PKCS8
    store = SvidStore(needs_own=False)
    locals_ = [f"l/g{i // GROUP}/w{i}" for i in range(LOCAL)]
    remotes = [f"r/g{i // GROUP}/w{i}" for i in range(REMOTE)]
    for path in locals_:
        minted = ca.mint(f"spiffe://example.org/{path}", live)
        key = minted.private_key.private_bytes(der, pkcs8, serialization.NoEncryption())
        store.set_local(sid(path), parse_svid([c.public_bytes(der) for c in minted.chain], key))
    store.set_bundles(BundleOrigin.DELEGATED_IDENTITY_API, {ca.trust_domain: ca.bundle()})
    store.set_local_synced(True)
    endpoints = [endpoint(p, "node-a", f"10.1.{i // 250}.{i % 250 + 1}/32") for i, p in enumerate(locals_)]
    endpoints += [endpoint(p, "node-b", f"10.2.{i // 250}.{i % 250 + 1}/32") for i, p in enumerate(remotes)]
    rules = [
        rule(f"spiffe://example.org/r/g{group}/*", f"spiffe://example.org/l/g{group}/*")
        for group in range(LOCAL // GROUP)
    ]
    cluster = state([node("node-a"), node("node-b")], endpoints, rules)
    handles = HandleRegistry(None, "node-a")
    attestations = Attestations(on_change=lambda _peers: None)
    asked: list[Peer] = []
    attestations.ask_through(_Recorder(asked))
    with PinnedMaps(pin_dir) as maps:
        manager = AuthManager(
            node_name="node-a",
            handles=handles,
            table=PinnedAuthTable(maps.auth, handles),
            tables=PinnedTables(maps.ipcache, maps.policy),
            svids=store,
            attestations=attestations,
            attest_port=4250,
        )
        task = asyncio.create_task(manager.run())
        try:
            manager.cluster_changed(cluster)
            await _until(lambda: len(asked) >= REMOTE)
            for peer in asked:
                minted = ca.mint(str(peer.remote_id), live)
                chain = tuple(x509.load_der_x509_certificate(c.public_bytes(der)) for c in minted.chain)
                attestations.proved(Attestation(peer.remote_id, peer.node, "192.0.2.2", chain, now))
            manager.attestations_changed(asked)
            await _until(lambda: manager.stats.entries >= LOCAL * PAIRED)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        del minted, chain
        gc.collect()
        return _rss_kib()


class _Recorder:
    """The channels as the results see them: record who is wanted; the bench proves them itself."""

    def __init__(self, asked: list[Peer]) -> None:
        self._asked = asked

    def want(self, targets: Mapping[Peer, Target]) -> None:
        self._asked[:] = list(targets)

    def ask_again(self, peers: Collection[Peer]) -> None:
        del peers

    def hurry(self, node: str) -> bool:
        del node
        return False


async def _until(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(600):
        while not condition():  # noqa: ASYNC110 - nothing offers an event for it
            await asyncio.sleep(0.05)


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("bench: no VmRSS")
