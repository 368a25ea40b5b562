"""The etcd source's retry and fail-static logic against a scripted store (real etcd: tests/integration)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

from authd.backoff import BackoffPolicy
from authd.cluster.etcd import Change
from authd.cluster.etcdcodec import encode_state
from authd.cluster.etcdsource import Coalescing, EtcdClusterSource, items_under
from authd.cluster.file import load_cluster, parse_cluster
from authd.errors import EtcdCompactedError, EtcdError
from authd.health import Component, Health, State
from tests.fakes.etcd import FakeStore
from tests.waiting import eventually

REPO = Path(__file__).resolve().parents[2]
TEXT = (REPO / "config" / "cluster.example.toml").read_text()
EXAMPLE = load_cluster(REPO / "config" / "cluster.example.toml")
PREFIX = "/p/"


class Stop(Exception):  # noqa: N818 - ends the run loop from the injected sleep
    pass


def items() -> dict[bytes, bytes]:
    return items_under(PREFIX, encode_state(EXAMPLE))


def moved_change(revision: int) -> Change:
    moved = encode_state(parse_cluster(TEXT.replace("10.1.0.5", "10.1.0.6")))
    key = next(k for k in moved if k.startswith("v1/endpoint/node-a/"))
    return Change((PREFIX + key).encode(), moved[key], revision)


def source_over(
    store: FakeStore,
    clock: list[float],
    sleeps: list[float],
    *,
    stop_after: int,
    health: Component | None = None,
) -> EtcdClusterSource:
    async def sleep(delay: float) -> None:
        sleeps.append(delay)
        if len(sleeps) >= stop_after:
            raise Stop

    return EtcdClusterSource(
        store,
        PREFIX,
        "node-a",
        health or Health().register("cluster"),
        backoff=BackoffPolicy(initial=1.0, maximum=4.0, jitter=0.0),
        sleep=sleep,
        clock=lambda: clock[0],
    )


async def run_until_stopped(source: EtcdClusterSource) -> None:
    with contextlib.suppress(Stop):
        await source.run()


async def test_outage_keeps_state_reports_age_and_resumes_from_the_next_revision() -> None:
    store = FakeStore(
        snapshots=[(7, items())],
        watches=[
            ([], EtcdError("etcd: cannot watch cluster state at m0: UNAVAILABLE")),
            ([], EtcdError("etcd: cannot watch cluster state at m1: UNAVAILABLE")),
            ([[moved_change(9)]], EtcdError("etcd: lost again")),
        ],
    )
    clock, sleeps = [100.0], list[float]()
    source = source_over(store, clock, sleeps, stop_after=3)
    await run_until_stopped(source)
    assert store.watched_from == [8, 8, 8]  # the same revision after every failure: nothing skipped
    assert store.closed
    assert source.revision == 9
    assert source.stats.snapshots == 1
    current = source.current()
    assert current is not None
    assert "10.1.0.6/32" in {str(p) for e in current.endpoints for p in e.prefixes}
    assert sleeps == [1.0, 2.0, 1.0]  # backoff grows while down, resets once a batch arrives
    assert source.stats.out_of_touch_since == 100.0
    assert source.stats.read_errors == 3


async def test_outage_before_any_state_is_degraded_without_state() -> None:
    store = FakeStore(snapshots=[EtcdError("etcd: cannot read cluster state at m0: UNAVAILABLE")])
    health = Health().register("cluster")
    source = source_over(store, [5.0], [], stop_after=1, health=health)
    await run_until_stopped(source)
    assert source.current() is None
    assert health.status.state is State.DEGRADED
    assert "UNAVAILABLE" in health.status.reason


async def test_compaction_reads_a_fresh_snapshot_at_once() -> None:
    store = FakeStore(
        snapshots=[(3, items()), (12, items())],
        watches=[
            ([], EtcdCompactedError("etcd: revision 4 is compacted", 10)),
            ([], EtcdError("etcd: down")),
        ],
    )
    clock, sleeps = [0.0], list[float]()
    source = source_over(store, clock, sleeps, stop_after=1)
    await run_until_stopped(source)
    assert store.watched_from == [4, 13]
    assert source.stats.snapshots == 2
    assert sleeps == [1.0]  # no backoff before the fresh snapshot


async def test_first_state_without_this_node_is_applied_but_degraded() -> None:
    store = FakeStore(snapshots=[(2, items())])
    health = Health().register("cluster")
    source = EtcdClusterSource(store, PREFIX, "node-z", health, backoff=BackoffPolicy(1.0, 1.0))
    await source.sync()
    assert source.current() is not None
    assert health.status.reason == 'this node "node-z" is not in cluster state etcd /p/'


def burst(count: int) -> list[list[Change]]:
    """``count`` single-change batches moving the web endpoint (revisions 3 on), every one a new state."""
    moved = encode_state(parse_cluster(TEXT))
    key = next(k for k in moved if k.startswith("v1/endpoint/node-a/"))
    value = moved[key]
    return [
        [
            Change(
                (PREFIX + key).encode(),
                value.replace(b"10.1.0.5", f"10.9.{i // 250}.{i % 250}".encode()),
                i + 3,
            )
        ]
        for i in range(count)
    ]


async def test_a_burst_of_changes_is_evaluated_once_the_watch_is_quiet() -> None:
    store = FakeStore(snapshots=[(2, items())], watches=[([[], *burst(1000)], None)])
    source = source_over(store, [0.0], [], stop_after=1)
    task = asyncio.create_task(source.run())
    try:
        await eventually(lambda: source.revision == 1002 and source.stats.applied == 2, within=5)
        current = source.current()
        assert current is not None
        assert "10.9.3.249/32" in {str(p) for e in current.endpoints for p in e.prefixes}
        await asyncio.sleep(0.1)  # several quiet windows: nothing left to evaluate
        assert source.stats.applied == 2  # the snapshot, then the whole burst at once
        assert source.stats.changes == 1000
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_changes_taken_are_evaluated_before_the_watch_fails() -> None:
    store = FakeStore(snapshots=[(2, items())], watches=[(burst(50), EtcdError("etcd: down"))])
    source = source_over(store, [0.0], [], stop_after=1)
    await run_until_stopped(source)
    assert source.stats.applied == 2
    assert source.revision == 52
    current = source.current()
    assert current is not None
    assert "10.9.0.49/32" in {str(p) for e in current.endpoints for p in e.prefixes}


async def test_a_steady_stream_is_still_evaluated_within_the_longest_wait() -> None:
    batches = burst(60)

    class Trickle(FakeStore):
        async def watch(self, prefix: bytes, start_revision: int) -> AsyncIterator[list[Change]]:
            del prefix, start_revision
            for batch in batches:
                await asyncio.sleep(0.005)  # never quiet for 1 s
                yield batch
            await asyncio.Event().wait()
            yield []

    store = Trickle(snapshots=[(2, items())])
    source = source_over(store, [0.0], [], stop_after=1)
    source.coalescing = Coalescing(quiet=1.0, longest=0.05)
    task = asyncio.create_task(source.run())
    try:
        await eventually(lambda: source.revision == 62, within=5)
        assert source.stats.applied >= 3  # evaluated during the stream, not only after it
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
