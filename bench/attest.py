"""Attestation over the node channels: convergence, pushed rotations, channels against pairs.

What runs, and why this way: two node processes, each running the in-process components the daemon wires
(SVID store, node channels, attestation results, auth manager) against *real* pinned BPF maps (so it
needs root), over loopback TLS 1.3 (127.0.0.2 and 127.0.0.3), with default attest settings.

* **Convergence** (``attest.converge_s_N``): node A hosts N identities, node B one; policy requires
  authentication both ways. Both processes first receive the SVIDs of their new workloads (untimed); the
  clock starts when both are handed the new cluster state and stops when both auth maps hold all 2N
  entries: the desired-state computation, the wants and N + 1 proofs over the one channel, and the map
  writes. It leaves out SPIRE issuing the SVIDs and the cluster file's poll interval.
* **Pushed rotations** (``attest.rotation_push_ms_p50``/``_p99``): with 1000 identities converged, A's
  store gets a rotated SVID (a different notAfter) for identities one at a time; the time from that to
  the moved expiry written in B's auth map (both processes read CLOCK_MONOTONIC).
* **Channels against pairs** (``attest.channels_for_20x20``, ``attest.pairs_for_20x20``): 20 identities
  on each node, every identity of one node paired with every one of the other both ways; the channel
  sessions both nodes opened, next to the auth entries both maps hold.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import multiprocessing
import multiprocessing.connection
import os
import secrets
import shutil
import socket
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from authd import log
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
from bench.figures import Figures, figure, median
from tests.fakes.ca import LeafOptions, TestCA
from tests.fakes.cluster import FakeClusterSource, endpoint, node, rule, state

TD = "example.org"
CONVERGE_ROUNDS = {1: 5, 100: 3, 1000: 2, 10000: 1}
ROTATIONS = 50
NODE_ADDRESSES = {"node-a": "127.0.0.2", "node-b": "127.0.0.3"}


def run() -> Figures:
    """Convergence, rotations and the 20 x 20 count, as root (real BPF maps)."""
    log.configure("warning", "console")
    figures: Figures = {}
    if os.geteuid() != 0:
        print("bench: attest needs root (real BPF maps); skipped")
        return figures
    world = _World.create()
    with _nodes(world) as cluster:
        for count, rounds in CONVERGE_ROUNDS.items():
            samples = [cluster.converge(count, round_) for round_ in range(rounds)]
            figures[f"attest.converge_s_{count}"] = figure(median(samples), "s")
            if count == 1000:
                pushes = sorted(cluster.rotations(count, rounds - 1))
                figures["attest.rotation_push_ms_p50"] = figure(_quantile(pushes, 0.5) * 1000, "ms")
                figures["attest.rotation_push_ms_p99"] = figure(_quantile(pushes, 0.99) * 1000, "ms")
        channels, pairs = cluster.twenty_by_twenty()
        figures["attest.channels_for_20x20"] = figure(channels, "channels")
        figures["attest.pairs_for_20x20"] = figure(pairs, "auth entries")
    return figures


# ------------------------------------------------------------------------------------- certificates


@dataclass
class _World:
    """One trust domain's CA and every SVID the benchmarks use, minted before any process forks."""

    ca: TestCA
    issuer: TestCA
    bundles: BundleSet
    own: dict[str, X509Svid]
    svids: dict[SpiffeId, X509Svid]

    @classmethod
    def create(cls) -> _World:
        now = dt.datetime.now(dt.UTC)
        root = TestCA.create(TD, not_before=now - dt.timedelta(days=1), not_after=now + dt.timedelta(days=2))
        issuer = root.intermediate()  # SPIRE's usual shape: leaf, intermediate, root in the bundle
        live = LeafOptions(not_before=now - dt.timedelta(minutes=1), not_after=now + dt.timedelta(hours=1))
        own = {name: issuer.mint(f"spiffe://{TD}/authd/{name}", live) for name in NODE_ADDRESSES}
        paths = [
            path
            for count, rounds in CONVERGE_ROUNDS.items()
            for round_ in range(rounds)
            for path in _remote_paths(count, round_)
        ]
        paths += [f"left/a{i}" for i in range(20)] + [f"right/b{i}" for i in range(20)] + ["local/l0"]
        svids = {}
        for path in paths:
            spiffe_id = SpiffeId.parse(f"spiffe://{TD}/{path}")
            svids[spiffe_id] = issuer.mint(str(spiffe_id), live)
        return cls(root, issuer, BundleSet.of([root.bundle()]), own, svids)


def _remote_paths(count: int, round_: int) -> list[str]:
    """New identities for every round: a warm cache of TLS contexts for old ones would flatter it."""
    return [f"remote-{count}-{round_}/r{index}" for index in range(count)]


def _quantile(samples: list[float], q: float) -> float:
    return samples[min(len(samples) - 1, int(q * len(samples)))]


@dataclass(frozen=True, slots=True)
class _Scenario:
    """Endpoints by node and the rules between them, as picklable text, and the entries to wait for."""

    endpoints: tuple[tuple[str, str], ...]  # (path, node)
    rules: tuple[tuple[str, str], ...]  # (source pattern, destination pattern), enforced both ways
    expected: dict[str, int]  # auth entries per node


def _cluster_state(scenario: _Scenario, ports: dict[str, int]) -> ClusterState:
    nodes = [node(name, address, attest_port=ports[name]) for name, address in NODE_ADDRESSES.items()]
    endpoints = [
        endpoint(path, on, f"10.{200 + list(NODE_ADDRESSES).index(on)}.{i // 250}.{i % 250 + 1}/32")
        for i, (path, on) in enumerate(scenario.endpoints)
    ]
    rules = [rule(f"spiffe://{TD}/{s}", f"spiffe://{TD}/{d}", "both") for s, d in scenario.rules]
    return state(nodes, endpoints, rules)


class _Cluster:
    """The two node processes, driven over pipes."""

    def __init__(self, pipes: dict[str, multiprocessing.connection.Connection]) -> None:
        self._pipes = pipes

    def apply(self, scenario: _Scenario) -> tuple[float, float]:
        """Hand both nodes the scenario's SVIDs, then its state; return when (monotonic) each happened.

        The first time is when the state was handed over, the second when both maps held its entries.
        """
        for pipe in self._pipes.values():
            pipe.send(("svids", scenario))
        for pipe in self._pipes.values():
            pipe.recv()
        started = time.monotonic()
        for pipe in self._pipes.values():
            pipe.send(("state", scenario))
        return started, float(max(pipe.recv() for pipe in self._pipes.values()))

    def opened(self) -> int:
        """Channel sessions both nodes opened so far (each channel counts once per side)."""
        for pipe in self._pipes.values():
            pipe.send(("opened", None))
        return sum(int(pipe.recv()) for pipe in self._pipes.values()) // 2

    def rotations(self, count: int, round_: int) -> list[float]:
        """Seconds from a rotated SVID at A to its moved expiry in B's map, for ROTATIONS identities."""
        paths = _remote_paths(count, round_)[:ROTATIONS]
        self._pipes["node-b"].send(("watch", paths))
        self._pipes["node-b"].recv()
        self._pipes["node-a"].send(("rotate", paths))
        rotated: dict[str, float] = self._pipes["node-a"].recv()
        self._pipes["node-b"].send(("written", paths))
        written: dict[str, float] = self._pipes["node-b"].recv()
        return [written[path] - rotated[path] for path in paths]

    def converge(self, count: int, round_: int) -> float:
        """Seconds from a new cluster state with ``count`` identities on A to all entries on both nodes."""
        self.apply(_Scenario((), (), {"node-a": 0, "node-b": 0}))  # start from nothing
        scenario = _Scenario(
            (*((path, "node-a") for path in _remote_paths(count, round_)), ("local/l0", "node-b")),
            (("local/l0", f"remote-{count}-{round_}/*"),),
            {"node-a": count, "node-b": count},
        )
        started, done = self.apply(scenario)
        return done - started

    def twenty_by_twenty(self) -> tuple[int, int]:
        """Channels opened for 20 x 20 identities (from no channel at all), and the auth entries made."""
        self.apply(_Scenario((), (), {"node-a": 0, "node-b": 0}))
        before = self.opened()
        scenario = _Scenario(
            tuple((f"left/a{i}", "node-a") for i in range(20))
            + tuple((f"right/b{i}", "node-b") for i in range(20)),
            (("left/*", "right/*"),),
            {"node-a": 400, "node-b": 400},
        )
        self.apply(scenario)
        return self.opened() - before, sum(scenario.expected.values())


def _fork(target: Callable[..., None], *args: object) -> multiprocessing.process.BaseProcess:
    process = multiprocessing.get_context("fork").Process(target=target, args=args, daemon=True)
    process.start()
    return process


@contextlib.contextmanager
def _nodes(world: _World) -> Iterator[_Cluster]:
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
            processes.append(_fork(_node_main, name, sockets[name], ports, pins[name], world, child_end))
            pipes[name] = parent_end
        for sock in sockets.values():
            sock.close()
        yield _Cluster(pipes)
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
    world: _World,
    pipe: multiprocessing.connection.Connection,
) -> None:
    asyncio.run(_Node(name, ports, pin_dir, world).run(sock, pipe))


class _Node:
    """One node's attestation and auth manager, wired as :mod:`authd.daemon` wires them."""

    def __init__(self, name: str, ports: dict[str, int], pin_dir: Path, world: _World) -> None:
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
                while (message := await asyncio.to_thread(pipe.recv)) is not None:
                    step, argument = message
                    if step == "opened":
                        pipe.send(sum(channels.stats.opened.values()))
                    elif step == "svids":
                        self._hold_svids(argument)
                        pipe.send(None)
                    elif step == "rotate":
                        pipe.send(await self._rotate(argument))
                    elif step == "watch":
                        table.watch = {SpiffeId.parse(f"spiffe://{TD}/{path}") for path in argument}
                        pipe.send(None)
                    elif step == "written":
                        pipe.send(await table.written_all(len(argument)))
                    else:
                        await self._apply(argument, manager, channels, pipe)
                for task in tasks:
                    task.cancel()

    async def _apply(
        self,
        scenario: _Scenario,
        manager: AuthManager,
        channels: Channels,
        pipe: multiprocessing.connection.Connection,
    ) -> None:
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
        pipe.send(time.monotonic())

    async def _rotate(self, paths: list[str]) -> dict[str, float]:
        """Rotate each identity in turn (SPIRE's way: a new SVID with a new notAfter); when each was."""
        now = dt.datetime.now(dt.UTC)
        live = LeafOptions(not_before=now - dt.timedelta(minutes=1), not_after=now + dt.timedelta(minutes=50))
        rotated = {}
        for path in paths:
            spiffe_id = SpiffeId.parse(f"spiffe://{TD}/{path}")
            svid = self.world.issuer.mint(str(spiffe_id), live)
            rotated[path] = time.monotonic()
            self.store.set_local(spiffe_id, svid)
            await asyncio.sleep(0.02)  # one at a time, as SPIRE rotates them
        return rotated

    def _hold_svids(self, scenario: _Scenario) -> None:
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


class _WriteTimes:
    """The auth table, noting when entries of watched remote identities were written (upserted)."""

    def __init__(self, table: AuthTable) -> None:
        self._table = table
        self.watch: set[SpiffeId] = set()
        self._written: dict[str, float] = {}

    def read(self) -> dict[AuthPair, datetime]:
        return self._table.read()

    def write(self, upserts: Mapping[AuthPair, datetime], deletes: Collection[AuthPair]) -> None:
        self._table.write(upserts, deletes)
        stamp = time.monotonic()
        for pair in upserts:
            if pair.remote in self.watch:
                self._written[pair.remote.path.removeprefix("/")] = stamp

    def purge_unresolved(self) -> int:
        return self._table.purge_unresolved()

    async def written_all(self, count: int) -> dict[str, float]:
        while len(self._written) < count:  # noqa: ASYNC110 - a bench's wait
            await asyncio.sleep(0.005)
        written, self._written = self._written, {}
        return written
