"""The auth manager's view of the pinned maps: pairs with SPIFFE IDs, desired ipcache and policy."""

from __future__ import annotations

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
