from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import gc
import weakref
from collections.abc import AsyncIterator
from dataclasses import dataclass

from authd.attest.results import Attestations, Peer
from authd.authmanager import AuthManager
from authd.cluster.desired import AuthPair
from authd.cluster.handles import HandleRegistry
from authd.cluster.model import ClusterState
from authd.errors import AttestError
from authd.x509svid import BundleSet, X509Svid
from tests.fakes.attest import ScriptedChannels
from tests.fakes.authtables import FakeAuthTable, FakeSvids, FakeTables
from tests.fakes.ca import LeafOptions, TestCA
from tests.fakes.cluster import endpoint, node, rule, sid, state
from tests.waiting import eventually


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


CA = TestCA.create(
    "example.org", not_before=now() - dt.timedelta(days=1), not_after=now() + dt.timedelta(days=2)
)


def svid(path: str, hours: float = 1.0) -> X509Svid:
    return CA.mint(
        str(sid(path)),
        LeafOptions(not_before=now() - dt.timedelta(minutes=1), not_after=now() + dt.timedelta(hours=hours)),
    )


def two_nodes(*extra_rules: tuple[str, str], web_and_db: bool = True) -> ClusterState:
    endpoints = [endpoint("web", "node-a", "10.1.0.5"), endpoint("cache", "node-a", "10.1.0.6")]
    if web_and_db:
        endpoints.append(endpoint("db", "node-b", "10.2.0.5"))
    rules = [rule(f"spiffe://example.org/{s}", f"spiffe://example.org/{d}", "both") for s, d in extra_rules]
    # node-c hosts nothing: it is listed last, so a target built from the wrong node would name it.
    return state([node("node-a"), node("node-b"), node("node-c")], endpoints, rules)


@dataclass
class Harness:
    manager: AuthManager
    table: FakeAuthTable
    tables: FakeTables
    svids: FakeSvids
    client: ScriptedChannels
    attestations: Attestations
    handles: HandleRegistry

    def pair(self, local: str, remote: str, node_name: str) -> AuthPair:
        handles = self.handles
        local_h, remote_h = handles.identity_handle(sid(local)), handles.identity_handle(sid(remote))
        node_h = handles.node_handle(node_name)
        assert local_h is not None
        assert remote_h is not None
        assert node_h is not None
        return AuthPair(sid(local), sid(remote), node_name, local_h, remote_h, node_h)

    async def settle(self) -> None:
        """Let the loop pick up what was marked, then return."""
        for _ in range(5):
            await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def manager(table: FakeAuthTable | None = None, *, synced: bool = True) -> AsyncIterator[Harness]:
    handles = HandleRegistry(None, "node-a")
    svids = FakeSvids(synced=synced)
    holder: list[AuthManager] = []
    attestations = Attestations(
        on_change=lambda peers: holder[0].attestations_changed(peers),  # noqa: PLW0108 - made below
    )
    client = ScriptedChannels(attestations)
    auth_table, tables = table or FakeAuthTable(), FakeTables()
    mgr = AuthManager(
        node_name="node-a",
        handles=handles,
        table=auth_table,
        tables=tables,
        svids=svids,
        attestations=attestations,
        attest_port=4250,
    )
    holder.append(mgr)
    tasks = [asyncio.create_task(mgr.run())]
    try:
        yield Harness(mgr, auth_table, tables, svids, client, attestations, handles)
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def test_known_pair_is_authenticated_before_traffic_with_the_earlier_expiry() -> None:
    db = svid("db", hours=2)
    async with manager() as h:
        h.client.script(str(sid("db")), "node-b", db)
        web = svid("web", hours=1)
        h.svids.local[sid("web")] = web
        h.manager.cluster_changed(two_nodes(("web", "db")))
        await eventually(lambda: len(h.table.entries) == 1)
        assert h.table.entries == {h.pair("web", "db", "node-b"): web.not_after}
        assert h.client.calls == {(str(sid("db")), "node-b"): 1}
        # The peer is asked at node-b's address, and must prove it is node-b's authd.
        assert [(t.node, str(t.node_id), t.addresses) for t in h.client.targets] == [
            ("node-b", "spiffe://example.org/authd/node-b", tuple(str(a) for a in node("node-b").addresses))
        ]
        assert h.tables.ipcache
        assert h.tables.policy


async def test_entries_that_expire_together_share_one_expiry_and_one_peer() -> None:
    # Issue 17: with 100k entries, a datetime and a Peer per entry were ~10 MiB the pairs did not need.
    async with manager() as h:
        h.client.script(str(sid("db")), "node-b", svid("db", hours=1))
        h.svids.local[sid("web")] = svid("web", hours=2)
        h.svids.local[sid("cache")] = svid("cache", hours=2)
        h.manager.cluster_changed(two_nodes(("web", "db"), ("cache", "db")))
        await eventually(lambda: len(h.table.entries) == 2)
        web, cache = (
            h.table.entries[h.pair("web", "db", "node-b")],
            h.table.entries[h.pair("cache", "db", "node-b")],
        )
        assert web is cache
        assert web is h.attestations.results()[Peer(sid("db"), "node-b")].not_after
        peers = {id(peer) for _, peer in h.manager._plan() if peer is not None}
        assert len(peers) == 1


async def test_local_rotation_moves_the_expiry_without_a_handshake() -> None:
    async with manager() as h:
        h.client.script(str(sid("db")), "node-b", svid("db", hours=3))
        h.svids.local[sid("web")] = svid("web", hours=1)
        h.manager.cluster_changed(two_nodes(("web", "db")))
        await eventually(lambda: len(h.table.entries) == 1)
        assert h.manager.fail_closed_at() == h.svids.local[sid("web")].not_after
        rotated = svid("web", hours=2)
        h.svids.local[sid("web")] = rotated
        h.manager.svids_changed()
        await eventually(lambda: set(h.table.entries.values()) == {rotated.not_after})
        assert h.client.calls == {(str(sid("db")), "node-b"): 1}
        assert h.manager.fail_closed_at() == rotated.not_after  # renewed: the horizon moved with it


async def test_removing_the_endpoint_removes_its_entries_and_its_peer() -> None:
    async with manager() as h:
        h.client.script(str(sid("db")), "node-b", svid("db"))
        h.svids.local[sid("web")] = svid("web")
        h.manager.cluster_changed(two_nodes(("web", "db")))
        await eventually(lambda: len(h.table.entries) == 1)
        h.manager.cluster_changed(two_nodes(("web", "db"), web_and_db=False))
        await eventually(lambda: not h.table.entries)
        assert not h.attestations.results()
        # Nothing refers to db any more: its handle is freed, web's is kept.
        await eventually(lambda: h.handles.identity_handle(sid("db")) is None)
        assert h.handles.identity_handle(sid("web")) is not None


async def test_handles_are_released_only_once_the_svids_synced() -> None:
    async with manager(synced=False) as h:
        h.handles.assign([sid("web"), sid("db"), sid("cache"), sid("gone")], ["node-b", "node-gone"])
        h.manager.cluster_changed(two_nodes(("web", "cache")))
        await eventually(lambda: h.manager.stats.reconciles >= 1)
        await h.settle()
        assert h.handles.identity_handle(sid("gone")) is not None
        assert h.handles.node_handle("node-gone") is not None
        h.svids.synced = True
        h.manager.svids_changed()
        await eventually(lambda: h.handles.identity_handle(sid("gone")) is None)
        assert h.handles.node_handle("node-gone") is None
        assert h.handles.identity_handle(sid("db")) is not None  # still in cluster state
        assert h.handles.node_handle("node-b") is not None


async def test_removing_the_local_svid_removes_its_entries() -> None:
    async with manager() as h:
        h.client.script(str(sid("db")), "node-b", svid("db"))
        h.svids.local[sid("web")] = svid("web")
        h.manager.cluster_changed(two_nodes(("web", "db")))
        await eventually(lambda: len(h.table.entries) == 1)
        del h.svids.local[sid("web")]
        h.manager.svids_changed()
        await eventually(lambda: not h.table.entries)


async def test_pairs_on_the_local_node_need_no_handshake() -> None:
    async with manager() as h:
        web, cache = svid("web", hours=1), svid("cache", hours=2)
        h.svids.local.update({sid("web"): web, sid("cache"): cache})
        h.manager.cluster_changed(two_nodes(("web", "cache")))
        await eventually(lambda: len(h.table.entries) == 2)
        assert h.table.entries == {
            h.pair("web", "cache", "node-a"): web.not_after,
            h.pair("cache", "web", "node-a"): web.not_after,
        }
        assert not h.client.calls


async def test_restored_entries_stay_while_the_peer_is_unreachable_and_go_when_it_refuses() -> None:
    web = svid("web")
    restored_expiry = now() + dt.timedelta(minutes=10)
    table = FakeAuthTable()
    async with manager(table) as h:
        h.handles.assign([sid("web"), sid("db"), sid("cache")], ["node-b"])
        pair = h.pair("web", "db", "node-b")
        table.entries[pair] = restored_expiry
        h.svids.local[sid("web")] = web
        h.client.script(str(sid("db")), "node-b", AttestError("unreachable", "node-b is down"))
        h.manager.cluster_changed(two_nodes(("web", "db")))
        await eventually(lambda: h.attestations.stats.attempts["unreachable"] >= 1)
        assert table.entries == {pair: restored_expiry}
        h.client.answers[(str(sid("db")), "node-b")].clear()
        h.client.script(str(sid("db")), "node-b", AttestError("not-hosted", "db moved away"))
        await eventually(lambda: not table.entries)


async def test_nothing_still_wanted_is_deleted_before_the_svids_synced() -> None:
    table = FakeAuthTable()
    async with manager(table, synced=False) as h:
        h.handles.assign([sid("web"), sid("db"), sid("cache")], ["node-b"])
        wanted = h.pair("web", "cache", "node-a")
        unwanted = h.pair("cache", "db", "node-b")
        expired = h.pair("web", "db", "node-b")
        table.entries.update(
            {
                wanted: now() + dt.timedelta(minutes=5),
                unwanted: now() + dt.timedelta(minutes=5),
                expired: now() - dt.timedelta(seconds=1),
            }
        )
        h.client.script(str(sid("db")), "node-b", AttestError("unreachable", "x"))
        h.manager.cluster_changed(two_nodes(("web", "cache"), ("web", "db")))
        await eventually(lambda: h.manager.stats.reconciles >= 1)
        await h.settle()
        assert set(table.entries) == {wanted}
        h.svids.synced = True
        h.manager.svids_changed()
        await eventually(lambda: not table.entries)


async def test_handshakes_grow_with_identities_not_pairs() -> None:
    locals_ = [f"l{i}" for i in range(20)]
    remotes = [f"r{i}" for i in range(20)]
    endpoints = [endpoint(p, "node-a", f"10.1.0.{i + 1}") for i, p in enumerate(locals_)]
    endpoints += [endpoint(p, "node-b", f"10.2.0.{i + 1}") for i, p in enumerate(remotes)]
    cluster = state(
        [node("node-a"), node("node-b")],
        endpoints,
        [
            rule(f"spiffe://example.org/{r}", f"spiffe://example.org/{loc}")
            for r in remotes
            for loc in locals_
        ],
    )
    async with manager() as h:
        for path in remotes:
            h.client.script(str(sid(path)), "node-b", svid(path))
        h.svids.local.update({sid(p): svid(p) for p in locals_})
        h.manager.cluster_changed(cluster)
        await eventually(lambda: len(h.table.entries) == 400, within=10)
        assert sum(h.client.calls.values()) == 20


async def test_auth_required_attests_on_demand_and_repairs_a_flushed_entry() -> None:
    async with manager() as h:
        h.svids.local[sid("web")] = svid("web")
        h.client.script(str(sid("db")), "node-b", AttestError("unreachable", "x"))
        h.manager.cluster_changed(two_nodes(("web", "db")))
        await eventually(lambda: h.attestations.stats.attempts["unreachable"] >= 1)
        h.client.answers[(str(sid("db")), "node-b")].clear()
        h.client.script(str(sid("db")), "node-b", svid("db"))
        pair = h.pair("web", "db", "node-b")
        h.manager.auth_required(pair.local_handle, pair.remote_handle, pair.node_handle)
        await eventually(lambda: pair in h.table.entries)
        h.table.entries.clear()  # someone flushed the map by hand
        h.manager.auth_required(pair.local_handle, pair.remote_handle, pair.node_handle)
        await eventually(lambda: pair in h.table.entries)
        h.manager.auth_required(999_999, pair.remote_handle, pair.node_handle)
        assert h.manager.stats.auth_required["unknown-identity"] == 1
        assert h.manager.stats.auth_required["known"] >= 1


async def test_entries_are_removed_when_they_expire() -> None:
    async with manager() as h:
        # Expires within two seconds (certificate times are whole seconds).
        short = svid("web", hours=0.0005)
        h.svids.local.update({sid("web"): short, sid("cache"): svid("cache")})
        h.manager.cluster_changed(two_nodes(("web", "cache")))
        await eventually(lambda: len(h.table.entries) == 2)
        assert h.manager.fail_closed_at() == short.not_after  # the first entry to lapse
        await eventually(lambda: not h.table.entries, within=5)
        assert h.manager.fail_closed_at() is None


async def test_attestation_results_update_only_their_pairs_without_reading_the_whole_map() -> None:
    remotes = [f"r{i}" for i in range(50)]
    endpoints = [endpoint("web", "node-a", "10.1.0.5")]
    endpoints += [endpoint(p, "node-b", f"10.2.0.{i + 1}") for i, p in enumerate(remotes)]
    cluster = state(
        [node("node-a"), node("node-b")],
        endpoints,
        [rule("spiffe://example.org/web", f"spiffe://example.org/{r}", "egress") for r in remotes],
    )
    async with manager() as h:
        web = svid("web", hours=1)
        h.svids.local[sid("web")] = web
        h.manager.cluster_changed(cluster)
        await eventually(lambda: h.manager.stats.reconciles >= 1)  # the peers are wanted, none answered
        for path in remotes:  # each answers now, pushed the way a peer node pushes its proofs
            h.client.script(str(sid(path)), "node-b", svid(path, hours=2))
        await eventually(lambda: len(h.table.entries) == 50)
        assert set(h.table.entries.values()) == {web.not_after}
        # Results arrive one peer at a time: each is a pass over that peer's pairs, not over the map.
        assert h.manager.stats.peer_reconciles >= 1
        assert h.table.reads == h.manager.stats.reconciles < 50
        # A refusal from one peer removes that peer's entry alone, again without a whole-map read.
        reads = h.table.reads
        h.client.answers[(str(sid("r7")), "node-b")].clear()
        h.client.script(str(sid("r7")), "node-b", AttestError("not-hosted", "r7 moved away"))
        h.attestations._peers[Peer(sid("r7"), "node-b")].result = None  # expire it without waiting
        assert h.attestations.request(Peer(sid("r7"), "node-b"))
        await eventually(lambda: len(h.table.entries) == 49)
        assert h.pair("web", "r7", "node-b") not in h.table.entries
        assert h.table.reads == reads


async def test_removing_the_remote_node_or_the_rule_removes_the_entries() -> None:
    async with manager() as h:
        h.client.script(str(sid("db")), "node-b", svid("db"))
        h.svids.local[sid("web")] = svid("web")
        h.manager.cluster_changed(two_nodes(("web", "db")))
        await eventually(lambda: len(h.table.entries) == 1)
        h.manager.cluster_changed(two_nodes())  # the rule is gone
        await eventually(lambda: not h.table.entries)
        h.manager.cluster_changed(two_nodes(("web", "db")))
        await eventually(lambda: len(h.table.entries) == 1)
        without_node_b = state(
            [node("node-a")],
            [endpoint("web", "node-a", "10.1.0.5"), endpoint("cache", "node-a", "10.1.0.6")],
            [rule("spiffe://example.org/web", "spiffe://example.org/db", "both")],
        )
        h.manager.cluster_changed(without_node_b)
        await eventually(lambda: not h.table.entries)
        assert not h.attestations.results()


async def test_a_periodic_full_reconcile_notices_what_others_did_to_the_map() -> None:
    async with manager() as h:
        h.manager.full_interval = dt.timedelta(milliseconds=50)
        h.client.script(str(sid("db")), "node-b", svid("db"))
        h.svids.local[sid("web")] = svid("web")
        h.manager.cluster_changed(two_nodes(("web", "db")))
        await eventually(lambda: len(h.table.entries) == 1)
        wanted = dict(h.table.entries)
        stray = h.pair("cache", "db", "node-b")
        h.table.entries.clear()  # flushed by hand...
        h.table.entries[stray] = now() + dt.timedelta(hours=1)  # ...and an entry nobody wants
        await eventually(lambda: h.table.entries == wanted)


async def test_a_bundle_change_that_unverifies_a_result_deletes_its_entries_at_once() -> None:
    async with manager() as h:
        h.client.script(str(sid("db")), "node-b", svid("db"))
        h.svids.local[sid("web")] = svid("web")
        h.manager.cluster_changed(two_nodes(("web", "db")))
        await eventually(lambda: len(h.table.entries) == 1)
        other = TestCA.create("example.org", not_before=now() - dt.timedelta(days=1))
        h.client.answers.clear()  # asked again, node-b has nothing that verifies under the new bundle
        h.attestations.bundles_changed(BundleSet.of([other.bundle()]))
        await eventually(lambda: not h.table.entries, within=1)


class CollectorWatchingTable(FakeAuthTable):
    """Notes, at each whole-map read, whether the cyclic garbage collector was running."""

    def __init__(self) -> None:
        super().__init__()
        self.collector_on: list[bool] = []

    def read(self) -> dict[AuthPair, dt.datetime]:
        self.collector_on.append(gc.isenabled())
        return super().read()


async def test_a_new_plan_is_built_with_the_collector_paused_then_frozen() -> None:
    table = CollectorWatchingTable()
    frozen = gc.get_freeze_count()
    async with manager(table) as h:
        h.client.script(str(sid("db")), "node-b", svid("db"))
        h.svids.local[sid("web")] = svid("web")
        h.manager.cluster_changed(two_nodes(("web", "db")))
        await eventually(lambda: h.manager.stats.reconciles == 1)
        assert table.collector_on == [False]  # the reconcile that built the plan
        assert gc.isenabled()
        assert gc.get_freeze_count() > frozen  # the plan is out of later collections
        h.manager.svids_changed()
        await eventually(lambda: h.manager.stats.reconciles == 2)
        assert table.collector_on == [False, True]  # the same plan: nothing long-lived is built


class Cycle:
    """Cyclic garbage once dropped: only the cyclic collector can free it."""

    def __init__(self) -> None:
        self.me = self


async def test_garbage_frozen_with_a_plan_is_freed_by_the_next_plan() -> None:
    # Issue 17: what was alive at a plan's freeze and later became cyclic garbage stayed for the life
    # of the process, since frozen objects are never collected.
    async with manager() as h:
        h.client.script(str(sid("db")), "node-b", svid("db"))
        h.svids.local[sid("web")] = svid("web")
        cycle = Cycle()
        freed = weakref.ref(cycle)
        h.manager.cluster_changed(two_nodes(("web", "db")))
        await eventually(lambda: h.manager.stats.reconciles == 1)
        del cycle
        gc.collect()
        assert freed() is not None  # frozen with the plan
        h.manager.cluster_changed(two_nodes(("web", "db"), ("cache", "db")))
        await eventually(lambda: h.manager.stats.reconciles == 2)
        assert freed() is None
        assert gc.isenabled()
