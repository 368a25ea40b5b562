from __future__ import annotations

import json
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from authd.cluster.handles import ANY, FIRST_IDENTITY, STATE_FILE, HandleRegistry
from authd.errors import ClusterStateError
from tests.fakes.cluster import sid


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "state" / STATE_FILE


def test_fresh_registry_assigns_from_256_and_node_handles_from_1(path: Path) -> None:
    registry = HandleRegistry.open(path, "node-a")
    assert registry.fresh
    assert registry.assign([sid("web"), sid("db"), sid("web")], ["node-b", "node-a", "node-c"])
    # Sorted, so the assignment does not depend on iteration order of the caller's sets.
    assert registry.identity_handle(sid("db")) == FIRST_IDENTITY
    assert registry.identity_handle(sid("web")) == FIRST_IDENTITY + 1
    assert registry.node_handle("node-a") == 0  # this node
    assert registry.node_handle("node-b") == 1
    assert registry.node_handle("node-c") == 2
    assert registry.identity_handle(sid("other")) is None
    assert registry.node_handle("node-d") is None
    assert not registry.assign([sid("web")], ["node-b"])  # nothing new


def test_names_for_flow_rendering(path: Path) -> None:
    registry = HandleRegistry.open(path, "node-a")
    registry.assign([sid("web")], ["node-b"])
    assert registry.identity_name(FIRST_IDENTITY) == "spiffe://example.org/web"
    assert registry.identity_name(0) is None  # world
    assert registry.identity_name(ANY) is None
    assert registry.identity_name(FIRST_IDENTITY + 1) is None
    assert registry.node_name(0) == "node-a"
    assert registry.node_name(1) == "node-b"
    assert registry.node_name(2) is None


def test_assignments_are_on_disk_before_assign_returns(path: Path) -> None:
    registry = HandleRegistry.open(path, "node-a")
    registry.assign([sid("web")], ["node-b"])
    document = json.loads(path.read_text())
    assert document == {"format": 1, "identities": {"spiffe://example.org/web": 256}, "nodes": {"node-b": 1}}
    assert not (path.parent / f".{STATE_FILE}.tmp").exists()


def test_handles_survive_a_restart(path: Path) -> None:
    first = HandleRegistry.open(path, "node-a")
    first.assign([sid(f"w{i}") for i in range(5)], ["node-b", "node-c"])
    first.release([sid("w1")], ["node-b"])
    restarted = HandleRegistry.open(path, "node-a")
    assert not restarted.fresh
    assert restarted.identities == first.identities
    assert restarted.nodes == first.nodes
    assert restarted.identity_handle(sid("w1")) is None
    # The freed handles are reused after the restart too, lowest first.
    restarted.assign([sid("new")], ["node-d"])
    assert restarted.identity_handle(sid("new")) == 257
    assert restarted.node_handle("node-d") == 1


def test_state_changes_reload_without_renumbering(path: Path) -> None:
    registry = HandleRegistry.open(path, "node-a")
    registry.assign([sid("web"), sid("db")], ["node-b"])
    before = dict(registry.identities)
    # A new cluster-state version adds identities: existing handles keep their numbers.
    registry.assign([sid("aaa"), sid("web"), sid("db")], ["node-b", "node-0"])
    assert {k: v for k, v in registry.identities.items() if k in before} == before
    assert registry.identity_handle(sid("aaa")) == 258
    assert registry.node_handle("node-0") == 2


def test_release_frees_only_what_is_released(path: Path) -> None:
    registry = HandleRegistry.open(path, "node-a")
    registry.assign([sid("a"), sid("b"), sid("c")])
    assert registry.identity_handle(sid("b")) == 257
    # Still assigned: a new identity never gets 257 while b holds it.
    registry.assign([sid("d")])
    assert registry.identity_handle(sid("d")) == 259
    assert registry.release([sid("b")])
    assert registry.identity_name(257) is None
    registry.assign([sid("e"), sid("f")])
    assert registry.identity_handle(sid("e")) == 257  # reused only now
    assert registry.identity_handle(sid("f")) == 260
    assert not registry.release([sid("never-assigned")], ["node-x", "node-a"])


def test_released_identity_that_comes_back_may_get_another_handle(path: Path) -> None:
    registry = HandleRegistry.open(path, "node-a")
    registry.assign([sid("a"), sid("b")])
    registry.release([sid("a")])
    registry.assign([sid("c")])  # takes 256
    registry.assign([sid("a")])
    assert registry.identity_handle(sid("a")) == 258


def test_failed_write_assigns_nothing(path: Path) -> None:
    registry = HandleRegistry.open(path, "node-a")
    registry.assign([sid("a")])
    blocker = path.parent / f".{STATE_FILE}.tmp"
    blocker.mkdir()  # a directory where the temporary file goes: unwritable even for root
    with pytest.raises(ClusterStateError, match="cannot write state file"):
        registry.assign([sid("b")], ["node-b"])
    with pytest.raises(ClusterStateError, match="cannot write state file"):
        registry.release([sid("a")])
    blocker.rmdir()
    assert registry.identity_handle(sid("b")) is None
    assert registry.node_handle("node-b") is None
    assert registry.identity_handle(sid("a")) == 256  # the release did not happen either
    assert HandleRegistry.open(path, "node-a").identities == {sid("a"): 256}


@pytest.mark.parametrize(
    ("content", "error"),
    [
        ("{", "not JSON"),
        ("[]", "not a format 1 handle state file"),
        ('{"format": 2, "identities": {}, "nodes": {}}', "not a format 1"),
        ('{"format": 1, "identities": [], "nodes": {}}', '"identities" and "nodes" must be objects'),
        (
            '{"format": 1, "identities": {"spiffe://example.org/a": 255}, "nodes": {}}',
            "outside 256..4294967294",
        ),
        ('{"format": 1, "identities": {"spiffe://example.org/a": 4294967295}, "nodes": {}}', "outside 256"),
        ('{"format": 1, "identities": {"spiffe://example.org/a": "256"}, "nodes": {}}', "outside 256"),
        ('{"format": 1, "identities": {"spiffe://example.org/a": true}, "nodes": {}}', "outside 256"),
        ('{"format": 1, "identities": {}, "nodes": {"node-b": 0}}', "outside 1.."),
        ('{"format": 1, "identities": {"web": 256}, "nodes": {}}', "bad identity 'web'"),
        (
            (
                '{"format": 1, "identities": {"spiffe://example.org/a": 256, "spiffe://example.org/b": 256},'
                ' "nodes": {}}'
            ),
            "identity handle is assigned twice",
        ),
        ('{"format": 1, "identities": {}, "nodes": {"b": 3, "c": 3}}', "node handle is assigned twice"),
    ],
)
def test_corrupt_state_is_moved_aside_and_registry_starts_fresh(path: Path, content: str, error: str) -> None:
    path.parent.mkdir(parents=True)
    path.write_text(content)
    with capture_logs() as logs:
        registry = HandleRegistry.open(path, "node-a")
    assert registry.fresh
    assert registry.identities == {}
    (entry,) = logs
    assert entry["log_level"] == "error"
    assert "pinned maps must be flushed" in entry["event"]
    assert error in entry["error"]
    assert not path.exists()
    assert (path.parent / f"{STATE_FILE}.corrupt").read_text() == content
    registry.assign([sid("a")])
    assert not HandleRegistry.open(path, "node-a").fresh


@pytest.mark.parametrize(
    ("content", "error"),
    [
        (bytes(range(256)) * 4, "not UTF-8"),  # garbage bytes (they crash-looped the daemon once)
        (b"", "not JSON"),
        (b'{"format": 1, "identities": {"spiffe://example.org/a": 2', "not JSON"),  # truncated
        (b"\x00" * 4096, "not JSON"),  # a file of zeros, as a crash on some file systems leaves
        (b"[" * 100_000 + b"]" * 100_000, "nested too deep"),
    ],
)
def test_state_bytes_that_are_no_document_start_fresh(path: Path, content: bytes, error: str) -> None:
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    with capture_logs() as logs:
        registry = HandleRegistry.open(path, "node-a")
    assert registry.fresh
    (entry,) = logs
    assert error in entry["error"]
    assert (path.parent / f"{STATE_FILE}.corrupt").read_bytes() == content


def test_unreadable_state_file_is_an_error_not_a_fresh_start(path: Path) -> None:
    path.mkdir(parents=True)  # a directory where the file should be: unreadable even for root
    with pytest.raises(ClusterStateError, match=f"cannot read state file {path}: .*remove it"):
        HandleRegistry.open(path, "node-a")


def test_write_is_atomic_rename(path: Path) -> None:
    registry = HandleRegistry.open(path, "node-a")
    registry.assign([sid("a")])
    inode = path.stat().st_ino
    registry.assign([sid("b")])
    assert path.stat().st_ino != inode  # replaced, never rewritten in place
    assert [p.name for p in path.parent.iterdir()] == [STATE_FILE]


def test_a_persisted_entry_for_the_local_node_stays_assigned(path: Path) -> None:
    # The node was remote before this node took its name: its old handle may still be in the maps.
    HandleRegistry.open(path, "node-x").assign([], ["node-a"])
    registry = HandleRegistry.open(path, "node-a")
    assert registry.node_handle("node-a") == 0
    registry.assign([], ["node-b"])
    assert registry.node_handle("node-b") == 2  # handle 1 is still held by the old entry
    assert registry.node_name(1) == "node-a"


def test_read_only_names_handles_and_never_touches_the_file(tmp_path: Path) -> None:
    path = tmp_path / "handles.json"
    with pytest.raises(ClusterStateError, match="cannot read state file"):
        HandleRegistry.read_only(path, "node-a")
    writer = HandleRegistry.open(path, "node-a")
    writer.assign([sid("web")], ["node-b"])
    reader = HandleRegistry.read_only(path, "node-a")
    assert reader.identity_name(256) == "spiffe://example.org/web"
    assert (reader.node_name(0), reader.node_name(1)) == ("node-a", "node-b")
    path.write_text("{not json")
    with pytest.raises(ClusterStateError, match="not JSON"):
        HandleRegistry.read_only(path, "node-a")
    assert path.read_text() == "{not json"  # a reader does not move a corrupt file aside; the daemon does
    assert not path.with_name("handles.json.corrupt").exists()
