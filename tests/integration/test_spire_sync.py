"""``authd spire sync`` against dev-spire's Entry API: creates, keeps, deletes only what it owns."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

from authd.cluster.model import ClusterState
from authd.identity import Selector, SpiffeId
from authd.spire.dev.service import workload_socket
from authd.spire.entries import EntryClient, RegistrationEntry
from authd.spire.sync import LEGACY_HINT, managed_hint, sync
from authd.spire.workload import SECURITY_HEADER
from tests.fakes.cluster import endpoint, node, state
from tests.fakes.entries import RecordingEntryApi
from tests.integration.devspire import ME, entry_socket, options, raw_fetch, running, short_dir

AGENT_A = SpiffeId.parse("spiffe://example.org/spire/agent/node-a")
AGENT_B = SpiffeId.parse("spiffe://example.org/spire/agent/node-b")


def cluster(*paths: str) -> ClusterState:
    nodes = [node("node-a", "192.0.2.1"), node("node-b", "192.0.2.2")]
    endpoints = [
        endpoint(
            path, "node-a" if i % 2 == 0 else "node-b", f"10.0.0.{i + 1}", selectors=[f"unix:uid:{1000 + i}"]
        )
        for i, path in enumerate(paths)
    ]
    return state(nodes, endpoints)


def summary(entries: list[RegistrationEntry]) -> set[tuple[str, str, tuple[str, ...], str]]:
    return {(str(e.spiffe_id), str(e.parent_id), tuple(map(str, e.selectors)), e.hint) for e in entries}


def hint_of(path: str, parent: SpiffeId, uid: int) -> str:
    return managed_hint(
        SpiffeId.parse(f"spiffe://example.org/{path}"), parent, [Selector("unix", f"uid:{uid}")]
    )


async def test_sync_creates_is_idempotent_and_removes_only_its_own_entries() -> None:
    with short_dir() as directory:
        async with (
            running(options(directory, nodes=("node-a", "node-b"))),
            EntryClient(entry_socket(directory)) as client,
        ):
            foreign = RegistrationEntry(
                SpiffeId.parse("spiffe://example.org/other"), AGENT_A, (Selector("unix", "uid:42"),)
            )
            assert (await client.create_entries([foreign]))[0].ok
            first = await sync(client, cluster("web", "db"))
            assert (len(first.create), len(first.delete)) == (2, 0)
            assert summary(await client.list_entries()) == {
                ("spiffe://example.org/other", str(AGENT_A), ("unix:uid:42",), ""),
                ("spiffe://example.org/web", str(AGENT_A), ("unix:uid:1000",), hint_of("web", AGENT_A, 1000)),
                ("spiffe://example.org/db", str(AGENT_B), ("unix:uid:1001",), hint_of("db", AGENT_B, 1001)),
            }
            again = await sync(client, cluster("web", "db"))
            assert (again.empty, again.unchanged) == (True, 2)
            dry = await sync(client, cluster("web"), dry_run=True)
            assert [str(e.spiffe_id) for e in dry.delete] == ["spiffe://example.org/db"]
            assert len(await client.list_entries()) == 3
            await sync(client, cluster("web"))
            assert {str(e.spiffe_id) for e in await client.list_entries()} == {
                "spiffe://example.org/other",
                "spiffe://example.org/web",
            }


async def test_sync_of_one_node_leaves_the_other_nodes_entries() -> None:
    with short_dir() as directory:
        async with (
            running(options(directory, nodes=("node-a", "node-b"))),
            EntryClient(entry_socket(directory)) as client,
        ):
            await sync(client, cluster("web", "db"))
            result = await sync(client, cluster(), nodes=["node-a"])
            assert [str(e.spiffe_id) for e in result.delete] == ["spiffe://example.org/web"]
            assert {str(e.spiffe_id) for e in await client.list_entries()} == {"spiffe://example.org/db"}


async def test_cli_dry_run_prints_the_plan(tmp_path: Path) -> None:
    with short_dir() as directory:
        async with running(options(directory, nodes=("node-a", "node-b"))):
            cluster_file = tmp_path / "cluster.toml"
            cluster_file.write_text(
                'trust_domain = "example.org"\n'
                '[[node]]\nname = "node-a"\naddresses = ["192.0.2.1"]\n'
                '[[endpoint]]\nspiffe_id = "spiffe://example.org/web"\nnode = "node-a"\n'
                'prefixes = ["10.0.0.1"]\nselectors = ["unix:uid:1000"]\n'
            )
            config = tmp_path / "authd.toml"
            config.write_text(
                f'[cluster]\nfile = "{cluster_file}"\n[spire]\nserver_socket = "{entry_socket(directory)}"\n'
            )
            code, stdout, stderr = await authd_cli("spire", "sync", "--config", str(config), "--dry-run")
            assert code == 0, stderr
            assert stdout.splitlines() == [
                (
                    "would create spiffe://example.org/web parent=spiffe://example.org/spire/agent/node-a "
                    "selectors=unix:uid:1000"
                ),
                "1 to create, 0 to delete, 0 unchanged",
            ]
            async with EntryClient(entry_socket(directory)) as client:
                assert await client.list_entries() == []


async def authd_cli(*args: str) -> tuple[int, str, str]:
    """Run the CLI without blocking the loop that serves dev-spire."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "authd", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    stdout, stderr = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, stdout.decode(), stderr.decode()


async def test_a_changed_entry_is_created_before_the_old_one_is_deleted() -> None:
    """SPIRE never stops issuing an endpoint's identity while its selectors change."""
    api = RecordingEntryApi()
    await sync(api, cluster("web"))
    nodes = [node("node-a", "192.0.2.1"), node("node-b", "192.0.2.2")]
    moved = state(nodes, [endpoint("web", "node-a", "10.0.0.1", selectors=["unix:uid:2000"])])
    await sync(api, moved)
    assert api.calls == [
        ("create", ["spiffe://example.org/web"]),
        ("create", ["spiffe://example.org/web"]),
        ("delete", ["spiffe://example.org/web"]),
    ]
    assert [str(e.selectors[0]) for e in api.entries.values()] == ["unix:uid:2000"]


def overlapping(*paths: str) -> ClusterState:
    """Endpoints on node-a whose selectors all match this test process: the first by uid, the next by
    uid and gid too (a caller matching the second always matches the first)."""
    extra = [f"unix:gid:{os.getgid()}"]
    endpoints = [
        endpoint(path, "node-a", f"10.0.0.{i + 1}", selectors=[str(ME), *extra[:i]])
        for i, path in enumerate(paths)
    ]
    return state([node("node-a", "192.0.2.1")], endpoints)


async def test_every_synced_entry_is_issued_even_when_one_caller_matches_several() -> None:
    """SPIRE's agent issues only the oldest of several matching entries with one hint (dev-spire too)."""
    with short_dir() as directory:
        async with running(options(directory)), EntryClient(entry_socket(directory)) as client:
            await sync(client, overlapping("web"))
            await asyncio.sleep(1.1)  # entries' created_at has a resolution of seconds: web is the oldest
            await sync(client, overlapping("web", "db"))
            issued = await raw_fetch(workload_socket(directory, "node-a"), SECURITY_HEADER)
            assert sorted(svid.spiffe_id for svid in issued.svids) == [
                "spiffe://example.org/db",
                "spiffe://example.org/web",
            ]
            hints = [e.hint for e in await client.list_entries()]
            assert len(set(hints)) == 2, hints


async def test_entries_with_the_legacy_shared_hint_are_owned_and_replaced() -> None:
    with short_dir() as directory:
        async with running(options(directory)), EntryClient(entry_socket(directory)) as client:
            web = SpiffeId.parse("spiffe://example.org/web")
            legacy = RegistrationEntry(web, AGENT_A, (ME,), hint=LEGACY_HINT)
            foreign = RegistrationEntry(web, AGENT_A, (ME, Selector("unix", "gid:1")), hint="authdx")
            assert all(r.ok for r in await client.create_entries([legacy, foreign]))
            result = await sync(client, overlapping("web"))
            assert ([e.hint for e in result.delete], len(result.create)) == ([LEGACY_HINT], 1)
            assert sorted(e.hint for e in await client.list_entries()) == sorted(
                ["authdx", managed_hint(web, AGENT_A, [ME])]
            )
            assert (await sync(client, overlapping("web"))).empty
