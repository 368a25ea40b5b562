"""Attestation: handshake rate and latency against one listener, convergence, handshakes against pairs.

What runs, and why this way:

* **Handshakes** (``attest.handshakes_per_s``, ``..._c16``, ``attest.latency_p50_ms``/``p99_ms``): authd's
  :class:`~authd.attest.listener.Listener` serves in a child process (a core of its own, as on a peer
  node) on 127.0.0.1 with default limits; this process runs the :class:`~authd.attest.client.Attestor`.
  Each attestation is the real thing: TCP connect, TLS 1.3 with P-256 SVIDs under an intermediate, the
  SNI choosing the served SVID, SPIFFE verification on both sides, the node proof. Sequential, then
  16 in flight; latencies are those of the sequential run. ``attest.raw_tls_handshakes_per_s`` is the
  same-run baseline: Python's ``ssl`` doing mutual TLS 1.3 handshakes with the same certificates and one
  byte back, without any SPIFFE verification, server also in a child process. Rounds alternate so that
  drifting load on a shared machine hits both alike; figures are medians.
* **Convergence** (``attest.converge_s_N``): two node processes, each running the in-process components
  the daemon wires (SVID store, listener, attestor, attestation schedule, auth manager) against *real*
  pinned BPF maps (so it needs root), over loopback TLS (127.0.0.2 and 127.0.0.3), with default attest
  settings. Node A hosts N identities, node B one; policy requires authentication both ways. Both
  processes first receive the SVIDs of their new workloads (untimed); the clock starts when both are
  handed the new cluster state and stops when both auth maps hold all 2N entries, so it counts the
  desired-state computation, N + 1 attestations (16 in flight, against one listener each) and the map
  writes. It leaves out what is not attestation: SPIRE issuing the new workloads' SVIDs and the cluster
  file's poll interval (the end-to-end demo measures those). Were the SVIDs to arrive after the state, a
  node asked too early answers "not hosted" and the asking node retries after its backoff (0.5 s first).
* **Handshakes against pairs** (``attest.handshakes_for_20x20``, ``attest.pairs_for_20x20``): the same two
  processes, 20 identities on each node, every identity of one node paired with every one of the other
  both ways; the count of attestations both listeners served, next to the auth entries both maps hold.
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
import ssl
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from authd import log
from authd.attest.client import Attestor, Target
from authd.attest.listener import Listener, bind
from authd.attest.schedule import Attestations
from authd.attest.tls import client_context, server_context
from authd.authmanager import AuthManager
from authd.backoff import BackoffPolicy
from authd.cluster.handles import HandleRegistry
from authd.cluster.model import ClusterState
from authd.cluster.source import LiveDirectory
from authd.config.model import AttestConfig
from authd.identity import SpiffeId
from authd.svids import BundleOrigin, SvidStore
from authd.x509svid import BundleSet, X509Svid
from bench.figures import Figures, figure, median
from tests.fakes.ca import LeafOptions, TestCA
from tests.fakes.cluster import FakeClusterSource, endpoint, node, rule, state
from tests.fakes.identities import FakeIdentities, FakeNodes

TD = "example.org"
ROUNDS = 5
ROUND_SECONDS = 0.6
IN_FLIGHT = 16
CONVERGE_ROUNDS = {1: 5, 100: 3, 1000: 2}
NODE_ADDRESSES = {"node-a": "127.0.0.2", "node-b": "127.0.0.3"}


def run() -> Figures:
    """Measure handshakes always; convergence and the 20 x 20 count only as root (real BPF maps)."""
    log.configure("warning", "console")
    world = _World.create()
    figures = _handshakes(world)
    if os.geteuid() != 0:
        print("bench: attest convergence needs root (real BPF maps); skipped")
        return figures
    with _nodes(world) as cluster:
        for count, rounds in CONVERGE_ROUNDS.items():
            samples = [cluster.converge(count, round_) for round_ in range(rounds)]
            figures[f"attest.converge_s_{count}"] = figure(median(samples), "s")
        handshakes, pairs = cluster.twenty_by_twenty()
        figures["attest.handshakes_for_20x20"] = figure(handshakes, "handshakes")
        figures["attest.pairs_for_20x20"] = figure(pairs, "auth entries")
    return figures


# ------------------------------------------------------------------------------------- certificates


@dataclass
class _World:
    """One trust domain's CA and every SVID the benchmarks use, minted before any process forks."""

    ca: TestCA
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
        return cls(root, BundleSet.of([root.bundle()]), own, svids)


def _remote_paths(count: int, round_: int) -> list[str]:
    """New identities for every round: a warm cache of TLS contexts for old ones would flatter it."""
    return [f"remote-{count}-{round_}/r{index}" for index in range(count)]


# --------------------------------------------------------------------------------------- handshakes


def _handshakes(world: _World) -> Figures:
    listener_ids = FakeIdentities(world.own["node-a"], trusted=world.bundles)
    served = next(iter(world.svids.values()))
    listener_ids.host(served)
    client_ids = FakeIdentities(world.own["node-b"], trusted=world.bundles)
    nodes = FakeNodes({world.own["node-b"].spiffe_id: "node-b"})

    attest_sock = bind("127.0.0.1", 0)
    raw_sock = bind("127.0.0.1", 0)
    servers = [
        _fork(_serve_attestations, attest_sock, listener_ids, nodes),
        _fork(_serve_raw_tls, raw_sock, served, world.bundles),
    ]
    target = Target(
        served.spiffe_id,
        "node-a",
        world.own["node-a"].spiffe_id,
        ("127.0.0.1",),
        attest_sock.getsockname()[1],
    )
    raw_port = raw_sock.getsockname()[1]
    attest_sock.close()
    raw_sock.close()
    try:
        return asyncio.run(_measure_handshakes(client_ids, target, raw_port, world))
    finally:
        for process in servers:
            process.terminate()
            process.join()


async def _measure_handshakes(
    client_ids: FakeIdentities, target: Target, raw_port: int, world: _World
) -> Figures:
    attestor = Attestor(client_ids, AttestConfig())
    raw_context = client_context(world.own["node-b"], world.bundles)

    async def attest() -> None:
        await attestor.attest(target)

    async def raw() -> None:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", raw_port, ssl=raw_context, server_hostname="bench.invalid"
        )
        await reader.readexactly(1)
        writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await writer.wait_closed()

    await attest()  # warm up both servers (contexts are built on first use)
    await raw()
    sequential, concurrent, baseline = [], [], []
    for _ in range(ROUNDS):
        sequential.append(await _rate(attest, 1))
        concurrent.append(await _rate(attest, IN_FLIGHT))
        baseline.append(await _rate(raw, 1))
    assert set(attestor.stats.results) == {"ok"}, attestor.stats.results
    # The sequential rounds' latencies: the last ones recorded are from concurrent rounds, so measure anew.
    attestor.stats.latencies.clear()
    deadline = time.monotonic() + ROUND_SECONDS * 2
    while time.monotonic() < deadline:
        await attest()
    latencies = sorted(attestor.stats.latencies)
    return {
        "attest.handshakes_per_s": figure(median(sequential), "1/s"),
        "attest.handshakes_per_s_c16": figure(median(concurrent), "1/s"),
        "attest.raw_tls_handshakes_per_s": figure(median(baseline), "1/s"),
        "attest.handshake_cost_in_raw_tls": figure(median(baseline) / median(sequential), "ratio"),
        "attest.latency_p50_ms": figure(_quantile(latencies, 0.5) * 1000, "ms"),
        "attest.latency_p99_ms": figure(_quantile(latencies, 0.99) * 1000, "ms"),
    }


async def _rate(operation: Callable[[], Any], in_flight: int) -> float:
    done = 0
    started = time.monotonic()
    deadline = started + ROUND_SECONDS

    async def worker() -> None:
        nonlocal done
        while time.monotonic() < deadline:
            await operation()
            done += 1

    async with asyncio.TaskGroup() as group:
        for _ in range(in_flight):
            group.create_task(worker())
    return done / (time.monotonic() - started)


def _quantile(samples: list[float], q: float) -> float:
    return samples[min(len(samples) - 1, int(q * len(samples)))]


def _fork(target: Callable[..., None], *args: object) -> multiprocessing.process.BaseProcess:
    process = multiprocessing.get_context("fork").Process(target=target, args=args, daemon=True)
    process.start()
    return process


def _serve_attestations(sock: socket.socket, identities: FakeIdentities, nodes: FakeNodes) -> None:
    listener = Listener(identities, nodes, AttestConfig())
    asyncio.run(listener.serve(sock))


def _serve_raw_tls(sock: socket.socket, svid: X509Svid, bundles: BundleSet) -> None:
    # Blocking sockets, one connection at a time: the simplest TLS server Python's ssl offers (asyncio's
    # TLS server answered 40 ms late on these machines, which would measure asyncio, not TLS).
    context = server_context(svid, bundles)
    sock.settimeout(None)
    while True:
        conn, _ = sock.accept()
        with contextlib.suppress(OSError), context.wrap_socket(conn, server_side=True) as tls:
            tls.sendall(b"!")


# ------------------------------------------------------------------------------------ convergence


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

    def served(self) -> int:
        """Attestations both listeners have served so far."""
        for pipe in self._pipes.values():
            pipe.send(("served", None))
        return sum(pipe.recv() for pipe in self._pipes.values())

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
        """Handshakes both listeners served for 20 x 20 identities, and the auth entries that made."""
        self.apply(_Scenario((), (), {"node-a": 0, "node-b": 0}))
        before = self.served()
        scenario = _Scenario(
            tuple((f"left/a{i}", "node-a") for i in range(20))
            + tuple((f"right/b{i}", "node-b") for i in range(20)),
            (("left/*", "right/*"),),
            {"node-a": 400, "node-b": 400},
        )
        self.apply(scenario)
        return self.served() - before, sum(scenario.expected.values())


@contextlib.contextmanager
def _nodes(world: _World) -> Iterator[_Cluster]:
    from authd.datapath.loader import Datapath, MapSizes, remove_pins  # noqa: PLC0415 - root only

    tag = secrets.token_hex(3)
    sockets = {name: bind(address, 0) for name, address in NODE_ADDRESSES.items()}
    ports = {name: sock.getsockname()[1] for name, sock in sockets.items()}
    pins = {name: Path(f"/sys/fs/bpf/aap-bench-{tag}-{name}") for name in NODE_ADDRESSES}
    sizes = MapSizes(ipcache=4096, policy=4096, auth=65536, events_bytes=1 << 20, flows=4096)
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
        listener = Listener(self.store, LiveDirectory(self.cluster), config)
        attestor = Attestor(self.store, config)
        holder: list[AuthManager] = []
        attestations = Attestations(
            attestor,
            renew_after=config.renew_after,
            backoff=BackoffPolicy(
                initial=config.retry_initial.total_seconds(), maximum=config.retry_max.total_seconds()
            ),
            max_in_flight=config.client_concurrency,
            on_change=lambda peers: holder[0].attestations_changed(peers) if holder else None,
        )
        handles = HandleRegistry(None, self.name)
        with PinnedMaps(self.pin_dir) as maps:
            manager = AuthManager(
                node_name=self.name,
                handles=handles,
                table=PinnedAuthTable(maps.auth, handles),
                tables=PinnedTables(maps.ipcache, maps.policy),
                svids=self.store,
                attestations=attestations,
                attest_port=config.port,
            )
            holder.append(manager)
            async with asyncio.TaskGroup() as group:
                tasks = [
                    group.create_task(listener.serve(sock)),
                    group.create_task(attestations.run()),
                    group.create_task(manager.run()),
                    group.create_task(self._feed_svids(manager)),
                ]
                while (message := await asyncio.to_thread(pipe.recv)) is not None:
                    step, scenario = message
                    if step == "served":
                        await asyncio.sleep(0.1)  # the last acceptance lines were counted after sending
                        pipe.send(listener.stats.served)
                        continue
                    if step == "svids":
                        self._hold_svids(scenario)
                        pipe.send(None)
                        continue
                    passes = manager.stats.reconciles + manager.stats.peer_reconciles
                    current = _cluster_state(scenario, self.ports)
                    self.cluster.publish(current)
                    manager.cluster_changed(current)
                    # Polled: the manager offers no event for "the map holds this many entries".
                    while (  # noqa: ASYNC110
                        manager.stats.reconciles + manager.stats.peer_reconciles == passes
                        or manager.stats.entries != scenario.expected[self.name]
                    ):
                        await asyncio.sleep(0.001)
                    pipe.send(time.monotonic())
                for task in tasks:
                    task.cancel()

    def _hold_svids(self, scenario: _Scenario) -> None:
        """What SPIRE would deliver: the SVIDs of this node's workloads in the scenario, and no others."""
        local = {
            SpiffeId.parse(f"spiffe://{TD}/{path}") for path, on in scenario.endpoints if on == self.name
        }
        for spiffe_id in set(self.store.local_svids()) - local:
            self.store.remove_local(spiffe_id, "bench")
        for spiffe_id in local:
            self.store.set_local(spiffe_id, self.world.svids[spiffe_id])

    async def _feed_svids(self, manager: AuthManager) -> None:
        with self.store.subscribe() as events:
            async for _event in events:
                manager.svids_changed()
