"""The watched cluster file: good -> bad -> good edits, atomic renames, in-place writes, health, stats."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from authd.attest.listener import NodeDirectory
from authd.cluster.file import RACY_SECONDS, FileClusterSource
from authd.cluster.model import ClusterState
from authd.cluster.source import ClusterSource, LiveDirectory, StateFeed, local_node_name
from authd.health import Health, State
from tests.fakes.cluster import FakeClusterSource, node, sid, state
from tests.unit.test_cluster_file import DB, GOOD, NODES, RULE, WEB

SETTLE = 2.0
"""The file source's default settle time."""


class World:
    """A cluster file in a temporary directory and a source watching it."""

    def __init__(self, directory: Path, *, local_node: str = "node-a", clock_offset: float = 10.0) -> None:
        self.path = directory / "cluster.toml"
        self.health = Health()
        self.component = self.health.register("cluster")
        # By default the clock runs ahead of file mtimes, so nothing counts as racily modified.
        self.source = FileClusterSource(
            self.path, local_node, self.component, clock=lambda: time.time() + clock_offset
        )

    def replace(self, text: str) -> None:
        """Write like an editor or config management: a temporary file renamed over the old one."""
        temporary = self.path.with_name(".cluster.toml.swp")
        temporary.write_text(text)
        temporary.replace(self.path)

    def write_in_place(self, text: str) -> None:
        """Write like `cat > file`: same inode, truncated and rewritten."""
        with self.path.open("r+") as file:
            file.truncate(0)
            file.write(text)

    def health_state(self) -> State:
        return self.component.status.state

    @property
    def reason(self) -> str:
        return self.component.status.reason


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(tmp_path)


def test_file_source_is_a_cluster_source(world: World) -> None:
    source: ClusterSource = world.source
    assert source.current() is None
    fake: ClusterSource = FakeClusterSource()
    assert fake.current() is None


def test_missing_file_at_start_degrades_then_recovers(world: World) -> None:
    with capture_logs() as logs:
        assert not world.source.poll()
        assert not world.source.poll()
    assert world.source.current() is None
    assert world.health_state() is State.DEGRADED
    assert "cluster.toml" in world.reason
    assert "No such file" in world.reason
    assert [e["event"] for e in logs] == ["cluster state file unreadable, keeping the last good state"]
    assert world.source.stats.read_errors == 1
    world.replace(GOOD)
    assert world.source.poll()
    assert world.health_state() is State.READY
    assert world.source.current() is not None


def test_good_bad_good(world: World) -> None:
    world.replace(GOOD)
    assert world.source.poll()
    good = world.source.current()
    assert good is not None
    assert world.health_state() is State.READY
    assert world.source.stats.version == good.version

    bad = GOOD.replace('node = "node-b"', 'node = "node-c"') + '[[policy]]\nsource = "*"\n'
    with capture_logs() as logs:
        world.replace(bad)
        assert not world.source.poll()
        assert not world.source.poll()  # the same bad version is not reported twice
    assert world.source.current() is good
    assert world.source.stats.rejected == 1
    (entry,) = logs
    assert entry["event"] == "cluster state rejected, keeping the last good state"
    assert entry["log_level"] == "error"
    assert entry["kept_version"] == good.version[:12]
    assert entry["problems"] == ["policy[1].destination: missing required key"]
    assert world.health_state() is State.DEGRADED
    assert "rejected (1 problem(s), first: policy[1].destination: missing required key)" in world.reason
    assert f"keeping version {good.version[:12]}" in world.reason

    # Fixing the decode problem reveals the cross-check problem: still rejected, still the old state.
    world.replace(GOOD.replace('node = "node-b"', 'node = "node-c"'))
    assert not world.source.poll()
    assert world.source.stats.rejected == 2
    assert 'endpoint[1].node: unknown node "node-c"' in world.reason

    fixed = GOOD + '[[policy]]\nsource = "*"\ndestination = "spiffe://example.org/web"\n'
    world.replace(fixed)
    assert world.source.poll()
    recovered = world.source.current()
    assert recovered is not None
    assert recovered.version != good.version
    assert len(recovered.rules) == 2
    assert world.health_state() is State.READY
    assert world.source.stats.applied == 2
    assert world.source.stats.problems == []


def test_bad_file_at_start_keeps_no_state(world: World) -> None:
    world.replace("[[node]\n")
    assert not world.source.poll()
    assert world.source.current() is None
    assert world.health_state() is State.DEGRADED
    assert "not valid TOML" in world.reason
    assert "keeping version" not in world.reason


def test_touch_without_change_is_a_no_op(world: World) -> None:
    world.replace(GOOD)
    assert world.source.poll()
    first = world.source.current()
    stat = world.path.stat()
    os.utime(world.path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))
    with capture_logs() as logs:
        assert not world.source.poll()
    assert logs == []
    assert world.source.current() is first
    assert world.source.stats.unchanged == 1
    assert world.source.stats.applied == 1


def test_edit_without_meaning_is_a_no_op(world: World) -> None:
    world.replace(GOOD)
    world.source.poll()
    first = world.source.current()
    # Comments and reordering change the bytes, not the state.
    world.replace("# reviewed\n" + NODES + DB + WEB + RULE)
    assert not world.source.poll()
    assert world.source.current() is first
    assert world.source.stats.unchanged == 1


def test_atomic_rename_is_seen_even_with_same_size_and_mtime(world: World) -> None:
    world.replace(GOOD)
    world.source.poll()
    before = world.path.stat()
    changed = GOOD.replace("10.1.0.1", "10.1.0.2")
    world.replace(changed)
    os.utime(world.path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = world.path.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    assert after.st_ino != before.st_ino
    assert world.source.poll()
    current = world.source.current()
    assert current is not None
    assert "10.1.0.2/32" in {str(p) for e in current.endpoints for p in e.prefixes}


def test_in_place_write_is_seen(world: World) -> None:
    world.replace(GOOD)
    world.source.poll()
    inode = world.path.stat().st_ino
    world.write_in_place(GOOD + '[[policy]]\nsource = "*"\ndestination = "*"\n')
    assert world.path.stat().st_ino == inode
    assert world.source.poll()
    current = world.source.current()
    assert current is not None
    assert len(current.rules) == 2


def test_same_size_in_place_write_within_one_timestamp_tick_is_seen(tmp_path: Path) -> None:
    # The clock says the file was just modified, so its unchanged stat is not trusted.
    now = [time.time()]
    world = World(tmp_path)
    world.source._clock = lambda: now[0]
    world.replace(GOOD)
    assert world.source.poll()
    before = world.path.stat()
    world.write_in_place(GOOD.replace("10.1.0.1", "10.1.0.2"))
    os.utime(world.path, ns=(before.st_atime_ns, before.st_mtime_ns))  # as if in the same tick
    now[0] += SETTLE + 1  # once the in-place write has settled
    assert world.source.poll()
    current = world.source.current()
    assert current is not None
    assert "10.1.0.2/32" in {str(p) for e in current.endpoints for p in e.prefixes}
    assert world.source.stats.unchanged == 0


def test_racy_window_ends(tmp_path: Path) -> None:
    now = [time.time()]
    world = World(tmp_path)
    world.source._clock = lambda: now[0]
    world.replace(GOOD)
    world.source.poll()
    assert not stat_trusted(world.source)  # just written: its stat says too little yet
    now[0] += RACY_SECONDS + 1
    world.source.poll()
    assert stat_trusted(world.source)
    assert world.source.stats.unchanged == 0  # re-reading the same version is not counted


def stat_trusted(source: FileClusterSource) -> bool:
    return source._seen is not None


def test_deleted_file_keeps_last_good_state(world: World) -> None:
    world.replace(GOOD)
    world.source.poll()
    good = world.source.current()
    world.path.unlink()
    with capture_logs() as logs:
        world.source.poll()
        world.source.poll()
    assert len(logs) == 1
    assert world.source.current() is good
    assert world.health_state() is State.DEGRADED
    assert f"keeping version {good.version[:12] if good else ''}" in world.reason
    world.replace(GOOD)
    assert not world.source.poll()  # same content: nothing new to apply
    assert world.health_state() is State.READY


def test_unreadable_path_is_a_read_error(world: World) -> None:
    world.path.mkdir()
    world.source.poll()
    assert world.source.current() is None
    assert world.source.stats.read_errors == 1
    assert world.reason == f"cluster: cannot read {world.path}: not a regular file (a directory)"


def test_fifo_in_the_files_place_is_refused_without_blocking(world: World) -> None:
    world.replace(GOOD)
    world.source.poll()
    good = world.source.current()
    world.path.unlink()
    os.mkfifo(world.path)
    # With no writer, a blocking open of the FIFO would never return: poll() returning at all is the proof.
    with capture_logs() as logs:
        assert not world.source.poll()
    (entry,) = logs
    assert entry["event"] == "cluster state file unreadable, keeping the last good state"
    assert entry["error"] == f"cluster: cannot read {world.path}: not a regular file (a FIFO)"
    assert world.source.current() is good
    assert world.health_state() is State.DEGRADED
    world.path.unlink()
    world.replace(GOOD.replace("10.1.0.1", "10.1.0.2"))
    assert world.source.poll()  # a valid version after the FIFO is applied at once


def test_non_utf8_is_rejected(world: World) -> None:
    world.path.write_bytes(b"\xff\xfe")
    world.source.poll()
    assert world.source.stats.rejected == 1
    assert "not UTF-8" in world.reason


def test_local_node_missing_is_degraded_not_fatal(tmp_path: Path) -> None:
    world = World(tmp_path, local_node="node-z")
    world.replace(GOOD)
    with capture_logs() as logs:
        assert world.source.poll()
    assert world.source.current() is not None  # published all the same: remote endpoints still matter
    assert world.health_state() is State.DEGRADED
    assert world.reason == f'this node "node-z" is not in cluster state {world.path}'
    assert any(e["event"] == "this node is not in cluster state" for e in logs)
    world.replace(GOOD + '[[node]]\nname = "node-z"\naddresses = ["192.0.2.26"]\n')
    assert world.source.poll()
    assert world.health_state() is State.READY


async def test_run_polls_with_the_injected_sleep(tmp_path: Path) -> None:
    path = tmp_path / "cluster.toml"
    edits = [GOOD, GOOD + '[[policy]]\nsource = "*"\ndestination = "*"\n', "garbage = [", GOOD]
    delays: list[float] = []

    async def sleep(delay: float) -> None:
        delays.append(delay)
        await asyncio.sleep(0)  # let the consumer take what was published
        if not edits:
            raise asyncio.CancelledError
        temporary = tmp_path / ".tmp"
        temporary.write_text(edits.pop(0))
        temporary.replace(path)
        await asyncio.sleep(0)

    health = Health()
    source = FileClusterSource(
        path, "node-a", health.register("cluster"), poll_interval=0.25, sleep=sleep, clock=lambda: 1e12
    )
    seen: list[ClusterState] = []

    async def consume() -> None:
        async for snapshot in source.snapshots():
            seen.append(snapshot)  # noqa: PERF401 - the loop never ends; it is cancelled

    consumer = asyncio.create_task(consume())
    with pytest.raises(asyncio.CancelledError):
        await source.run()
    consumer.cancel()
    assert delays == [0.25] * 5
    assert source.stats.applied == 3  # GOOD, GOOD+rule, then GOOD again after the rejected garbage
    assert source.stats.rejected == 1
    assert source.stats.read_errors == 1  # the first poll, before the file existed
    assert [len(s.rules) for s in seen] == [1, 2, 1]


async def test_feed_gives_latest_value_to_slow_consumers() -> None:
    feed = StateFeed()
    versions = [state([node(f"node-{i}")]) for i in range(4)]
    iterator = feed.snapshots()
    waiting = asyncio.ensure_future(anext(iterator))
    await asyncio.sleep(0)
    assert not waiting.done()  # nothing yet
    feed.publish(versions[0])
    assert await waiting is versions[0]
    for version in versions[1:]:
        feed.publish(version)  # the consumer is busy; only the newest matters
    assert await anext(iterator) is versions[3]
    late = feed.snapshots()
    assert await anext(late) is versions[3]  # a new consumer starts from the state in force
    pending = asyncio.ensure_future(anext(late))
    await asyncio.sleep(0)
    assert not pending.done()
    pending.cancel()


def test_local_node_name_prefers_config_then_lowercased_host_name() -> None:
    assert local_node_name("node-a") == "node-a"
    assert local_node_name(None) == socket.gethostname().lower()


def test_live_directory_follows_the_state_in_force() -> None:
    source = FakeClusterSource()
    directory: NodeDirectory = LiveDirectory(source)
    assert directory.node_named_by(sid("authd/node-a")) is None  # no state yet
    source.publish(state([node("node-a")]))
    assert directory.node_named_by(sid("authd/node-a")) == "node-a"
    assert directory.node_named_by(sid("web")) is None
    source.publish(state([node("node-b")]))
    assert directory.node_named_by(sid("authd/node-a")) is None  # removed: refused at once


NODES_ONLY = NODES
"""The cluster file truncated after its [[node]] tables: valid, and without a single endpoint."""


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", 'it no longer lists this node "node-a"'),
        (NODES_ONLY, "it removes every endpoint (2)"),
        (NODES_ONLY + RULE, "it removes every endpoint (2)"),
    ],
    ids=["empty", "truncated", "truncated-with-policy"],
)
def test_bad_deploy_is_held_back_until_accepted(world: World, text: str, reason: str) -> None:
    world.replace(GOOD)
    assert world.source.poll()
    good = world.source.current()
    with capture_logs() as logs:
        world.replace(text)
        assert not world.source.poll()
        assert not world.source.poll()  # held once, logged once
    (entry,) = logs
    assert (
        entry["event"] == "cluster state held back until `authd cluster accept`, keeping the last good state"
    )
    assert entry["reason"] == reason
    assert world.source.current() is good
    assert world.source.stats.holds == 1
    assert world.source.stats.held_reason == reason
    assert world.health_state() is State.DEGRADED
    assert f"held back: {reason}; `authd cluster accept` applies it" in world.reason
    accepted = world.source.accept()
    assert world.source.current() is accepted
    assert accepted.version == world.source.stats.version
    assert not accepted.endpoints
    assert world.source.stats.held_reason == ""
    with pytest.raises(LookupError):
        world.source.accept()


def test_a_later_good_version_drops_the_held_one(world: World) -> None:
    world.replace(GOOD)
    world.source.poll()
    world.replace("")
    world.source.poll()
    assert world.source.stats.held_reason
    fixed = GOOD.replace("10.1.0.1", "10.1.0.2")
    world.replace(fixed)
    assert world.source.poll()
    assert world.source.stats.held_reason == ""
    assert world.health_state() is State.READY
    with pytest.raises(LookupError):
        world.source.accept()  # nothing is left to accept: the empty version is gone for good


def test_reverting_to_the_state_in_force_drops_the_held_one(world: World) -> None:
    world.replace(GOOD)
    world.source.poll()
    world.replace(NODES)
    world.source.poll()
    world.replace(GOOD)
    assert not world.source.poll()
    assert world.source.stats.held_reason == ""
    assert world.health_state() is State.READY


def test_removal_share_is_configurable(tmp_path: Path) -> None:
    world = World(tmp_path)
    world.source = FileClusterSource(
        world.path, "node-a", world.component, max_endpoint_removal=0.4, clock=lambda: time.time() + 10
    )
    world.replace(GOOD)
    world.source.poll()
    world.replace(NODES + WEB + RULE)  # one of two endpoints gone: 50% > 40%
    assert not world.source.poll()
    assert world.source.stats.held_reason == (
        "it removes 1 of 2 endpoints, more than the 40% allowed at once (cluster.max_endpoint_removal)"
    )


def test_half_written_file_is_not_read_until_it_settles(tmp_path: Path) -> None:
    now = [time.time() + 10]
    world = World(tmp_path)
    world.source._clock = lambda: now[0]
    world.replace(GOOD)
    assert world.source.poll()
    good = world.source.current()
    # A slow writer, caught after the nodes and one endpoint: valid TOML, and a smaller state.
    with world.path.open("r+") as writer:
        writer.truncate(0)
        writer.write(NODES + WEB)
        writer.flush()
        now[0] = time.time()
        for _ in range(3):
            now[0] += 0.5  # one second and a half of a stalled writer, polled every half second
            assert not world.source.poll()
            assert world.source.current() is good
        writer.write(DB + RULE.replace("db", "web"))
    now[0] = time.time() + SETTLE + 1
    assert world.source.poll()
    current = world.source.current()
    assert current is not None
    assert len(current.endpoints) == 2
    assert world.source.stats.applied == 2  # the half-written version was never applied


def test_atomic_rename_is_applied_without_waiting(tmp_path: Path) -> None:
    world = World(tmp_path, clock_offset=0.0)
    world.replace(GOOD)
    assert world.source.poll()
    world.replace(GOOD.replace("10.1.0.1", "10.1.0.2"))  # modified just now, but a new inode
    assert world.source.poll()
