"""The node processes of :mod:`bench.attest`: each runs a node's attestation against its own pinned maps.

The parent drives each one over a pipe, one step at a time (see :meth:`_Node.step`).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import multiprocessing
import multiprocessing.connection
import secrets
import shutil
import socket
import time
from collections.abc import Awaitable, Callable, Collection, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from authd.attest.channels import Channels, bind
from authd.attest.results import Attestations
from authd.authmanager import AuthManager, AuthTable
from authd.backoff import BackoffPolicy
from authd.cluster.desired import AuthPair
from authd.cluster.handles import HandleRegistry
from authd.cluster.model import ClusterState
from authd.config.model import AttestConfig
from authd.identity import SpiffeId
from authd.svids import BundleOrigin, SvidStore
from authd.x509svid import BundleSet, X509Svid
from tests.fakes.ca import LeafOptions, TestCA
from tests.fakes.cluster import FakeClusterSource, endpoint, node, rule, state

TD = "example.org"
NODE_ADDRESSES = {"node-a": "127.0.0.2", "node-b": "127.0.0.3"}
LAPSE_WAIT = 3.0
"""Seconds to wait for stragglers before an expected write counts as missing."""


# ------------------------------------------------------------------------------------- certificates


@dataclass
class World:
    """One trust domain's CA and every SVID the benchmarks use, minted before any process forks."""

    ca: TestCA
    issuer: TestCA
    bundles: BundleSet
    own: dict[str, X509Svid]
    svids: dict[SpiffeId, X509Svid]

    @classmethod
    def create(cls, paths: list[str]) -> World:
        """The CA, an intermediate, both nodes' SVIDs and one SVID for each path (one hour each)."""
        now = dt.datetime.now(dt.UTC)
        root = TestCA.create(TD, not_before=now - dt.timedelta(days=1), not_after=now + dt.timedelta(days=2))
        issuer = root.intermediate()  # SPIRE's usual shape: leaf, intermediate, root in the bundle
        live = LeafOptions(not_before=now - dt.timedelta(minutes=1), not_after=now + dt.timedelta(hours=1))
        own = {name: issuer.mint(f"spiffe://{TD}/authd/{name}", live) for name in NODE_ADDRESSES}
        svids = {}
        for path in paths:
            spiffe_id = SpiffeId.parse(f"spiffe://{TD}/{path}")
            svids[spiffe_id] = issuer.mint(str(spiffe_id), live)
        return cls(root, issuer, BundleSet.of([root.bundle()]), own, svids)


@dataclass(frozen=True, slots=True)
class Scenario:
    """Endpoints by node and the rules between them, as picklable text, and the entries to wait for."""

    endpoints: tuple[tuple[str, str], ...]  # (path, node)
    rules: tuple[tuple[str, str], ...]  # (source pattern, destination pattern), enforced both ways
    expected: dict[str, int]  # auth entries per node


def _cluster_state(scenario: Scenario, ports: dict[str, int]) -> ClusterState:
    nodes = [node(name, address, attest_port=ports[name]) for name, address in NODE_ADDRESSES.items()]
    endpoints = [
        endpoint(path, on, f"10.{200 + list(NODE_ADDRESSES).index(on)}.{i // 250}.{i % 250 + 1}/32")
        for i, (path, on) in enumerate(scenario.endpoints)
    ]
    rules = [rule(f"spiffe://{TD}/{s}", f"spiffe://{TD}/{d}", "both") for s, d in scenario.rules]
    return state(nodes, endpoints, rules)


def fork(target: Callable[..., None], *args: object) -> multiprocessing.process.BaseProcess:
    """Run ``target(*args)`` in a forked daemon process."""
    process = multiprocessing.get_context("fork").Process(target=target, args=args, daemon=True)
    process.start()
    return process


@contextlib.contextmanager
def nodes(world: World) -> Iterator[tuple[dict[str, multiprocessing.connection.Connection], dict[str, int]]]:
    """Both node processes, with their own pins and loopback listeners: their pipes, and ports."""
    from authd.datapath.loader import Datapath, MapSizes, remove_pins  # noqa: PLC0415 - root only

    tag = secrets.token_hex(3)
    sockets = {name: bind(address, 0) for name, address in NODE_ADDRESSES.items()}
    ports = {name: sock.getsockname()[1] for name, sock in sockets.items()}
    pins = {name: Path(f"/sys/fs/bpf/aap-bench-{tag}-{name}") for name in NODE_ADDRESSES}
    sizes = MapSizes(ipcache=32768, policy=32768, auth=65536, events_bytes=1 << 20, flows=4096)
    loaded = [Datapath.load(pins[name], sizes) for name in NODE_ADDRESSES]
    processes, pipes = [], {}
    try:
        for name in NODE_ADDRESSES:
            parent_end, child_end = multiprocessing.get_context("fork").Pipe()
            processes.append(fork(_node_main, name, sockets[name], ports, pins[name], world, child_end))
            pipes[name] = parent_end
        for sock in sockets.values():
            sock.close()
        yield pipes, ports
    finally:
        for pipe in pipes.values():
            with contextlib.suppress(OSError):
                pipe.send(None)
        for process in processes:
            process.join(10)
            if process.is_alive():
                process.kill()
                process.join()
        for datapath, pin_dir in zip(loaded, pins.values(), strict=True):
            datapath.close()
            remove_pins(pin_dir)
            shutil.rmtree(pin_dir, ignore_errors=True)


def _node_main(
    name: str,
    sock: socket.socket,
    ports: dict[str, int],
    pin_dir: Path,
    world: World,
    pipe: multiprocessing.connection.Connection,
) -> None:
    asyncio.run(_Node(name, ports, pin_dir, world).run(sock, pipe))


class _Node:
    """One node's attestation and auth manager, wired as :mod:`authd.daemon` wires them."""

    def __init__(self, name: str, ports: dict[str, int], pin_dir: Path, world: World) -> None:
        self.name = name
        self.ports = ports
        self.pin_dir = pin_dir
        self.world = world
        self.store = SvidStore()
        self.store.set_own(world.own[name])
        self.store.set_bundles(BundleOrigin.DELEGATED_IDENTITY_API, world.bundles.bundles)
        self.store.set_local_synced(True)
        self.cluster = FakeClusterSource()

    async def run(self, sock: socket.socket, pipe: multiprocessing.connection.Connection) -> None:
        from authd.datapath.maps import PinnedMaps  # noqa: PLC0415 - root only
        from authd.datapath.tables import PinnedAuthTable, PinnedTables  # noqa: PLC0415

        config = AttestConfig()
        holder: list[AuthManager] = []
        attestations = Attestations(
            on_change=lambda peers: holder[0].attestations_changed(peers) if holder else None
        )
        channels = Channels(
            self.name,
            self.store,
            attestations,
            config,
            BackoffPolicy(
                initial=config.retry_initial.total_seconds(), maximum=config.retry_max.total_seconds()
            ),
        )
        attestations.ask_through(channels)
        handles = HandleRegistry(None, self.name)
        with PinnedMaps(self.pin_dir) as maps:
            table = _WriteTimes(PinnedAuthTable(maps.auth, handles))
            manager = AuthManager(
                node_name=self.name,
                handles=handles,
                table=table,
                tables=PinnedTables(maps.ipcache, maps.policy),
                svids=self.store,
                attestations=attestations,
                attest_port=config.port,
            )
            holder.append(manager)
            async with asyncio.TaskGroup() as group:
                tasks = [
                    group.create_task(channels.serve(sock)),
                    group.create_task(channels.run()),
                    group.create_task(manager.run()),
                    group.create_task(self._feed_svids(manager, channels)),
                ]
                steps = self._steps(manager, channels, table)
                while (message := await asyncio.to_thread(pipe.recv)) is not None:
                    name, argument = message
                    pipe.send(await steps[name](argument))
                for task in tasks:
                    task.cancel()

    def _steps(
        self, manager: AuthManager, channels: Channels, table: _WriteTimes
    ) -> dict[str, Callable[[Any], Awaitable[object]]]:
        """What the parent can ask for, by name: each takes the step's argument, returns what to send back."""

        async def opened(_: None) -> int:
            return sum(channels.stats.opened.values())

        async def svids(scenario: Scenario) -> None:
            self._hold_svids(scenario)

        async def watch(paths: list[str]) -> None:
            table.watch = _ids(paths)

        async def lapse_watch(paths: list[str]) -> None:
            table.watch_lapses(_ids(paths))

        return {
            "opened": opened,
            "svids": svids,
            "state": lambda scenario: self._apply(scenario, manager, channels),
            "rotate": lambda argument: self._rotate(*argument),
            "watch": watch,
            "written": lambda paths: table.written_all(len(paths)),
            "lapse-watch": lapse_watch,
            "lapses": table.lapses,
        }

    async def _apply(self, scenario: Scenario, manager: AuthManager, channels: Channels) -> float:
        passes = manager.stats.reconciles + manager.stats.peer_reconciles
        current = _cluster_state(scenario, self.ports)
        self.cluster.publish(current)
        channels.cluster_changed(current)
        manager.cluster_changed(current)
        # Polled: the manager offers no event for "the map holds this many entries".
        while (  # noqa: ASYNC110
            manager.stats.reconciles + manager.stats.peer_reconciles == passes
            or manager.stats.entries != scenario.expected[self.name]
        ):
            await asyncio.sleep(0.001)
        return time.monotonic()

    async def _rotate(self, paths: list[str], not_after: float | None = None) -> dict[Any, float]:
        """Rotate each identity in turn (SPIRE's way: a new SVID with a new notAfter); when each was.

        Keyed by path, or with ``not_after`` (a POSIX time) by (path, not_after).
        """
        now = dt.datetime.now(dt.UTC)
        expiry = now + dt.timedelta(minutes=50)
        if not_after is not None:
            expiry = dt.datetime.fromtimestamp(not_after, dt.UTC)
        live = LeafOptions(not_before=now - dt.timedelta(minutes=1), not_after=expiry)
        rotated: dict[Any, float] = {}
        for path in paths:
            spiffe_id = SpiffeId.parse(f"spiffe://{TD}/{path}")
            svid = self.world.issuer.mint(str(spiffe_id), live)
            rotated[path if not_after is None else (path, not_after)] = time.monotonic()
            self.store.set_local(spiffe_id, svid)
            await asyncio.sleep(0.02)  # one at a time, as SPIRE rotates them
        return rotated

    def _hold_svids(self, scenario: Scenario) -> None:
        """What SPIRE would deliver: the SVIDs of this node's workloads in the scenario, and no others."""
        local = {
            SpiffeId.parse(f"spiffe://{TD}/{path}") for path, on in scenario.endpoints if on == self.name
        }
        for spiffe_id in set(self.store.local_svids()) - local:
            self.store.remove_local(spiffe_id, "bench")
        for spiffe_id in local:
            self.store.set_local(spiffe_id, self.world.svids[spiffe_id])

    async def _feed_svids(self, manager: AuthManager, channels: Channels) -> None:
        """As the daemon feeds them: every SVID change to the manager, local ones to the channels."""
        with self.store.subscribe() as events:
            async for event in events:
                if event.spiffe_id is not None and not event.own:
                    channels.local_changed(event.spiffe_id)
                manager.svids_changed()


def _ids(paths: list[str]) -> set[SpiffeId]:
    return {SpiffeId.parse(f"spiffe://{TD}/{path}") for path in paths}


class _WriteTimes:
    """The auth table, noting when entries of watched remote identities were written (upserted)."""

    def __init__(self, table: AuthTable) -> None:
        self._table = table
        self.watch: set[SpiffeId] = set()
        self._written: dict[str, float] = {}
        self._lapse_watch: set[SpiffeId] = set()
        self._expiry: dict[SpiffeId, datetime] = {}  # the last written expiry of each watched pair
        self._first: dict[tuple[str, float], float] = {}  # (path, expiry): when first written
        self._lapses = 0

    def watch_lapses(self, remotes: set[SpiffeId]) -> None:
        """Count lapses of the entries of ``remotes`` from now on, and note when each expiry was written."""
        self._lapse_watch = remotes
        self._expiry = {pair.remote: at for pair, at in self._table.read().items() if pair.remote in remotes}
        self._first, self._lapses = {}, 0

    async def lapses(self, expected: list[tuple[str, float]]) -> tuple[dict[tuple[str, float], float], int]:
        """When each (path, expiry) was written, and the lapses: late renewals, deletes, and missing ones."""
        deadline = time.monotonic() + LAPSE_WAIT
        while not set(expected) <= set(self._first) and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.005)
        missing = len(set(expected) - set(self._first))
        first, self._lapse_watch = self._first, set()
        return first, self._lapses + missing

    def read(self) -> dict[AuthPair, datetime]:
        return self._table.read()

    def write(self, upserts: Mapping[AuthPair, datetime], deletes: Collection[AuthPair]) -> None:
        self._table.write(upserts, deletes)
        stamp, wall = time.monotonic(), datetime.now(dt.UTC)
        for pair, expiry in upserts.items():
            if pair.remote in self.watch:
                self._written[pair.remote.path.removeprefix("/")] = stamp
            if pair.remote in self._lapse_watch:
                previous = self._expiry.get(pair.remote)
                if previous is not None and previous <= wall:
                    self._lapses += 1  # renewed only after it had expired
                self._expiry[pair.remote] = expiry
                self._first.setdefault((pair.remote.path.removeprefix("/"), expiry.timestamp()), stamp)
        self._lapses += sum(1 for pair in deletes if pair.remote in self._lapse_watch)

    def purge_unresolved(self) -> int:
        return self._table.purge_unresolved()

    async def written_all(self, count: int) -> dict[str, float]:
        while len(self._written) < count:  # noqa: ASYNC110 - a bench's wait
            await asyncio.sleep(0.005)
        written, self._written = self._written, {}
        return written
