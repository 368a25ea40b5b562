"""The auth manager's view of the pinned maps: pairs with SPIFFE IDs, desired ipcache and policy."""

from __future__ import annotations

import gc
from datetime import UTC, datetime, timedelta
from ipaddress import ip_network

import pytest

from authd.authmanager import AuthTable, DatapathTables
from authd.cluster import desired
from authd.cluster.handles import HandleRegistry
from authd.datapath.layout import IDENTITY_ANY, AuthType, Direction
from authd.datapath.maps import AuthKey, IpcacheEntry, PinnedMaps, PolicyKey
from authd.datapath.tables import PinnedAuthTable, PinnedTables
from authd.identity import SpiffeId

pytestmark = pytest.mark.privileged

WEB, DB, API = (SpiffeId.parse(f"spiffe://example.org/ns/app/sa/{n}") for n in ("web", "db", "api"))


@pytest.fixture
def handles() -> HandleRegistry:
    registry = HandleRegistry(None, "node-a")
    registry.assign([WEB, DB, API], ["node-a", "node-b"])
    return registry


def pair(handles: HandleRegistry, local: SpiffeId, remote: SpiffeId, node: str) -> desired.AuthPair:
    local_handle, remote_handle = handles.identity_handle(local), handles.identity_handle(remote)
    node_handle = handles.node_handle(node)
    assert local_handle is not None
    assert remote_handle is not None
    assert node_handle is not None
    return desired.AuthPair(local, remote, node, local_handle, remote_handle, node_handle)


def test_auth_pairs_round_trip_through_the_map(maps: PinnedMaps, handles: HandleRegistry) -> None:
    table: AuthTable = PinnedAuthTable(maps.auth, handles)
    soon = datetime(2030, 1, 1, 12, 0, 0, tzinfo=UTC)
    web_db = pair(handles, WEB, DB, "node-b")
    web_api = pair(handles, WEB, API, "node-a")
    table.write({web_db: soon, web_api: soon + timedelta(hours=1)}, [])
    assert table.read() == {web_db: soon, web_api: soon + timedelta(hours=1)}
    web_db_handles = (web_db.local_handle, web_db.remote_handle, web_db.node_handle)
    assert maps.auth.get(AuthKey(*web_db_handles, AuthType.SPIRE)) == soon
    table.write({}, [web_db])
    assert table.read() == {web_api: soon + timedelta(hours=1)}
    # An entry whose handles the registry does not know (written by an older run) is skipped, not misread.
    maps.auth.update_many({AuthKey(9999, web_api.remote_handle, 0): soon})
    assert table.read() == {web_api: soon + timedelta(hours=1)}
    assert isinstance(table, PinnedAuthTable)
    assert table.unresolved == 1
    # Garbage collection deletes it, and only it.
    assert table.purge_unresolved() == 1
    assert maps.auth.get(AuthKey(9999, web_api.remote_handle, 0)) is None
    assert table.read() == {web_api: soon + timedelta(hours=1)}
    assert table.purge_unresolved() == 0


def test_sync_writes_only_differences(maps: PinnedMaps) -> None:
    tables: DatapathTables = PinnedTables(maps.ipcache, maps.policy)
    net_a, net_b, net_c = ip_network("10.0.1.5/32"), ip_network("fd00::/64"), ip_network("10.0.2.0/24")
    assert tables.sync_ipcache({net_a: IpcacheEntry(256, 0), net_b: IpcacheEntry(257, 1)}) == 2
    assert tables.sync_ipcache({net_a: IpcacheEntry(256, 0), net_b: IpcacheEntry(257, 1)}) == 0
    assert tables.sync_ipcache({net_a: IpcacheEntry(258, 0), net_c: IpcacheEntry(257, 1)}) == 3
    assert dict(maps.ipcache.items()) == {net_a: IpcacheEntry(258, 0), net_c: IpcacheEntry(257, 1)}

    any_in = PolicyKey(256, IDENTITY_ANY, Direction.INGRESS)
    web_out = PolicyKey(256, 257, Direction.EGRESS)
    assert tables.sync_policy({any_in: AuthType.SPIRE, web_out: AuthType.SPIRE}) == 2
    assert tables.sync_policy({any_in: AuthType.SPIRE}) == 1
    assert dict(maps.policy.items()) == {PolicyKey(256, 0xFFFFFFFF, Direction.INGRESS): AuthType.SPIRE}


def test_a_large_write_and_read_reuse_the_pair_objects(maps: PinnedMaps) -> None:
    ids = [SpiffeId.parse(f"spiffe://example.org/w{i}") for i in range(60)]
    registry = HandleRegistry(None, "node-a")
    registry.assign(ids, ["node-a"])
    table = PinnedAuthTable(maps.auth, registry, write_chunk=1000)
    soon = datetime(2030, 1, 1, 12, 0, 0, tzinfo=UTC)
    written = {pair(registry, local, remote, "node-a"): soon for local in ids for remote in ids}
    assert len(written) > 3 * 1000  # four batch syscalls
    table.write(written, [])
    read = table.read()
    assert read == written
    mine = {id(p) for p in written}
    assert all(id(p) in mine for p in read)  # no new pair per entry: the ones written come back
    key, expiry = next(iter(maps.auth.packed_items().items()))
    assert not gc.is_tracked(key)
    assert not gc.is_tracked(expiry)


class _Names:
    """Handle names a test sets, as the registry would give them."""

    def __init__(self, identities: dict[int, str]) -> None:
        self.identities = identities

    def identity_name(self, handle: int) -> str | None:
        return self.identities.get(handle)

    def node_name(self, handle: int) -> str | None:
        return "node-a" if handle == 0 else None


def test_a_handle_given_to_another_identity_reads_as_that_identity(maps: PinnedMaps) -> None:
    names = _Names({1: str(WEB), 2: str(DB)})
    table = PinnedAuthTable(maps.auth, names)
    soon = datetime(2030, 1, 1, 12, 0, 0, tzinfo=UTC)
    web_db = desired.AuthPair(WEB, DB, "node-a", 1, 2, 0)
    table.write({web_db: soon}, [])
    assert table.read() == {web_db: soon}
    names.identities[2] = str(API)  # handle 2 released, then assigned to another identity
    assert table.read() == {desired.AuthPair(WEB, API, "node-a", 1, 2, 0): soon}
