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
* **A flood** (``attest.flood_lapses``, ``attest.flood_p99_ms``): FLOOD_IDS identities on A are rotated in
  rounds, each round giving every one a new SVID that expires FLOOD_MARGIN seconds later, so an entry at B
  lapses unless each proof arrives in time. Meanwhile a third process floods B's listener (the side that
  accepts the channel) from 127.0.0.9, which is no node: 2000 bare connections, 1000 bogus ClientHellos and
  1000 TLS handshakes without a client certificate, repeated until the rounds are done. A lapse is a
  renewal written after the entry it renews had expired, a watched entry deleted, or a proof that never
  arrived. The latency is the rotation-push time, as above; ``attest.flood_quiet_p99_ms`` is the same
  rounds without the flood, in the same run, and ``attest.flood_answered`` counts flood connections that
  got any byte back (goal 0: none reaches TLS).
"""

from __future__ import annotations

import asyncio
import multiprocessing
import multiprocessing.connection
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from authd import log
from bench.attest_nodes import NODE_ADDRESSES, Scenario, World, fork, nodes
from bench.figures import Figures, figure, median
from tests.privileged.flood import Flood, flood

if TYPE_CHECKING:
    from multiprocessing.sharedctypes import Synchronized
    from multiprocessing.synchronize import Event

CONVERGE_ROUNDS = {1: 5, 100: 3, 1000: 2, 10000: 1}
ROTATIONS = 50
FLOOD_IDS = 50
FLOOD_ROUNDS = 5  # at least; rounds go on until the flood has been sent in full
FLOOD_MARGIN = 3  # seconds from a rotation to the rotated SVID's expiry
FLOOD_SOURCE = "127.0.0.9"  # no node's address


def run() -> Figures:
    """Convergence, rotations and the 20 x 20 count, as root (real BPF maps)."""
    log.configure("warning", "console")
    figures: Figures = {}
    if os.geteuid() != 0:
        print("bench: attest needs root (real BPF maps); skipped")
        return figures
    paths = [
        path
        for count, rounds in CONVERGE_ROUNDS.items()
        for round_ in range(rounds)
        for path in _remote_paths(count, round_)
    ]
    paths += [f"left/a{i}" for i in range(20)] + [f"right/b{i}" for i in range(20)] + ["local/l0"]
    with nodes(World.create(paths + _flood_paths())) as (pipes, ports):
        cluster = _Cluster(pipes, ports)
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
        figures.update(cluster.flood())
    return figures


def _remote_paths(count: int, round_: int) -> list[str]:
    """New identities for every round: a warm cache of TLS contexts for old ones would flatter it."""
    return [f"remote-{count}-{round_}/r{index}" for index in range(count)]


def _flood_paths() -> list[str]:
    return [f"flood/r{index}" for index in range(FLOOD_IDS)]


def _quantile(samples: list[float], q: float) -> float:
    return samples[min(len(samples) - 1, int(q * len(samples)))]


class _Cluster:
    """The two node processes, driven over pipes."""

    def __init__(
        self, pipes: dict[str, multiprocessing.connection.Connection], ports: dict[str, int]
    ) -> None:
        self._pipes = pipes
        self._ports = ports

    def apply(self, scenario: Scenario) -> tuple[float, float]:
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
        self._pipes["node-a"].send(("rotate", (paths,)))
        rotated: dict[str, float] = self._pipes["node-a"].recv()
        self._pipes["node-b"].send(("written", paths))
        written: dict[str, float] = self._pipes["node-b"].recv()
        return [written[path] - rotated[path] for path in paths]

    def converge(self, count: int, round_: int) -> float:
        """Seconds from a new cluster state with ``count`` identities on A to all entries on both nodes."""
        self.apply(Scenario((), (), {"node-a": 0, "node-b": 0}))  # start from nothing
        scenario = Scenario(
            (*((path, "node-a") for path in _remote_paths(count, round_)), ("local/l0", "node-b")),
            (("local/l0", f"remote-{count}-{round_}/*"),),
            {"node-a": count, "node-b": count},
        )
        started, done = self.apply(scenario)
        return done - started

    def twenty_by_twenty(self) -> tuple[int, int]:
        """Channels opened for 20 x 20 identities (from no channel at all), and the auth entries made."""
        self.apply(Scenario((), (), {"node-a": 0, "node-b": 0}))
        before = self.opened()
        scenario = Scenario(
            tuple((f"left/a{i}", "node-a") for i in range(20))
            + tuple((f"right/b{i}", "node-b") for i in range(20)),
            (("left/*", "right/*"),),
            {"node-a": 400, "node-b": 400},
        )
        self.apply(scenario)
        return self.opened() - before, sum(scenario.expected.values())

    def flood(self) -> Figures:
        """Rotation rounds at A without, then with, a flood of B's listener from a non-node address."""
        paths = _flood_paths()
        self.apply(
            Scenario(
                (*((path, "node-a") for path in paths), ("local/l0", "node-b")),
                (("local/l0", "flood/*"),),
                {"node-a": FLOOD_IDS, "node-b": FLOOD_IDS},
            )
        )
        quiet, _ = self._rounds(paths, lambda rounds: rounds >= FLOOD_ROUNDS)
        context = multiprocessing.get_context("fork")
        stop = context.Event()
        sent, answered = context.Value("q", 0), context.Value("q", 0)
        flooder = fork(_flood_main, NODE_ADDRESSES["node-b"], self._ports["node-b"], stop, sent, answered)
        try:
            pushes, lapses = self._rounds(
                paths, lambda rounds: rounds >= FLOOD_ROUNDS and sent.value >= FLOOD.total
            )
        finally:
            stop.set()
            flooder.join(60)
            if flooder.is_alive():
                flooder.kill()
                flooder.join()
        if flooder.exitcode != 0:
            raise RuntimeError(f"bench: the flood process failed (exit {flooder.exitcode})")
        return {
            "attest.flood_lapses": figure(lapses, "lapses"),
            "attest.flood_p99_ms": figure(_quantile(sorted(pushes), 0.99) * 1000, "ms"),
            "attest.flood_p50_ms": figure(_quantile(sorted(pushes), 0.5) * 1000, "ms"),
            "attest.flood_quiet_p99_ms": figure(_quantile(sorted(quiet), 0.99) * 1000, "ms"),
            "attest.flood_connections": figure(sent.value, "connections"),
            "attest.flood_answered": figure(answered.value, "connections"),
        }

    def _rounds(self, paths: list[str], enough: Callable[[int], bool]) -> tuple[list[float], int]:
        """Rotate every identity once per round until ``enough(rounds)``; push latencies and lapses at B."""
        self._pipes["node-b"].send(("lapse-watch", paths))
        self._pipes["node-b"].recv()
        rotated: dict[tuple[str, float], float] = {}
        rounds, not_after = 0, 0.0
        while not enough(rounds):
            not_after = max(float(int(time.time()) + 1 + FLOOD_MARGIN), not_after + 1)
            self._pipes["node-a"].send(("rotate", (paths, not_after)))
            rotated.update(self._pipes["node-a"].recv())
            rounds += 1
        self._pipes["node-b"].send(("lapses", list(rotated)))
        written, lapses = self._pipes["node-b"].recv()
        return [written[key] - at for key, at in rotated.items() if key in written], lapses


FLOOD = Flood(server_name="node-b")


def _flood_main(
    address: str, port: int, stop: Event, sent: Synchronized[int], answered: Synchronized[int]
) -> None:
    """Send the flood again and again from FLOOD_SOURCE until ``stop`` (a full one at least)."""

    async def main() -> None:
        while True:
            refused = await flood(address, port, FLOOD, source=FLOOD_SOURCE)
            with sent.get_lock(), answered.get_lock():
                sent.value += FLOOD.total
                answered.value += FLOOD.total - refused
            if stop.is_set():
                return

    asyncio.run(main())
