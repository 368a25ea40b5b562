"""The pinned maps as the auth manager sees them: auth pairs with SPIFFE IDs, desired ipcache and policy.

:class:`PinnedAuthTable` implements :class:`authd.authmanager.AuthTable` and :class:`PinnedTables`
implements :class:`authd.authmanager.DatapathTables`. They translate auth pairs (SPIFFE IDs with their
handles) to map keys, and write only differences, in batches.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from datetime import datetime
from typing import Protocol

import structlog

from authd.cluster.desired import AuthPair
from authd.cluster.model import IpNetwork
from authd.datapath.layout import AuthType
from authd.datapath.maps import AuthKey, AuthMap, IpcacheEntry, IpcacheMap, PolicyKey, PolicyMap
from authd.errors import SpiffeIdError
from authd.identity import SpiffeId

log = structlog.get_logger(__name__)


class HandleNames(Protocol):
    """Names behind handles (implemented by :class:`authd.cluster.handles.HandleRegistry`)."""

    def identity_name(self, handle: int) -> str | None:
        """The SPIFFE ID behind an identity handle, if assigned."""
        ...

    def node_name(self, handle: int) -> str | None:
        """The node behind a node handle (this node's name for 0), if assigned."""
        ...


def _auth_key(pair: AuthPair) -> AuthKey:
    return AuthKey(pair.local_handle, pair.remote_handle, pair.node_handle, AuthType.SPIRE)


class PinnedAuthTable:
    """The auth map in terms of :class:`~authd.cluster.desired.AuthPair`."""

    def __init__(self, auth: AuthMap, names: HandleNames) -> None:
        """Read and write ``auth``, naming handles through ``names``."""
        self._auth = auth
        self._names = names
        self.unresolved = 0
        # Parsed SPIFFE IDs by handle, kept across reads (the map is read on every reconcile) and checked
        # against the registry's name each time, since a released handle may come back for another ID.
        self._parsed: dict[int, tuple[str, SpiffeId | None]] = {}

    def read(self) -> dict[AuthPair, datetime]:
        """Every SPIRE entry whose handles resolve, read from the map; the others are counted and skipped."""
        ids: dict[int, SpiffeId | None] = {}
        pairs: dict[AuthPair, datetime] = {}
        unresolved = 0
        for key, expires in self._auth.items():
            if key.auth_type is not AuthType.SPIRE:
                continue
            local = self._identity(key.local, ids)
            remote = self._identity(key.remote, ids)
            node = self._names.node_name(key.remote_node)
            if local is None or remote is None or node is None:
                unresolved += 1
                continue
            pairs[AuthPair(local, remote, node, key.local, key.remote, key.remote_node)] = expires
        if unresolved != self.unresolved:
            log.info("auth map entries with unknown handles", count=unresolved)
        self.unresolved = unresolved
        return pairs

    def _identity(self, handle: int, cache: dict[int, SpiffeId | None]) -> SpiffeId | None:
        if handle not in cache:
            name = self._names.identity_name(handle)
            parsed = self._parsed.get(handle)
            if name is None:
                cache[handle] = None
            elif parsed is not None and parsed[0] == name:
                cache[handle] = parsed[1]
            else:
                try:
                    spiffe_id: SpiffeId | None = SpiffeId.parse(name)
                except SpiffeIdError:
                    spiffe_id = None
                self._parsed[handle] = (name, spiffe_id)
                cache[handle] = spiffe_id
        return cache[handle]

    def purge_unresolved(self) -> int:
        """Delete entries whose handles name no identity or node: no reconcile could ever match them."""
        ids: dict[int, SpiffeId | None] = {}
        stale = [
            key
            for key, _expires in self._auth.items()
            if self._identity(key.local, ids) is None
            or self._identity(key.remote, ids) is None
            or self._names.node_name(key.remote_node) is None
        ]
        if stale:
            self._auth.delete_many(stale)
            log.info("auth map entries with unknown handles deleted", count=len(stale))
        self.unresolved = 0
        return len(stale)

    def write(self, upserts: Mapping[AuthPair, datetime], deletes: Collection[AuthPair]) -> None:
        """Delete, then write, each in one pass (upserts in one batch syscall)."""
        if deletes:
            self._auth.delete_many(_auth_key(pair) for pair in deletes)
        if upserts:
            self._auth.update_many({_auth_key(pair): expires for pair, expires in upserts.items()})


class PinnedTables:
    """The ipcache and policy maps, made equal to desired values by writing differences."""

    def __init__(self, ipcache: IpcacheMap, policy: PolicyMap) -> None:
        """Sync these two maps."""
        self._ipcache = ipcache
        self._policy = policy

    def sync_ipcache(self, desired: Mapping[IpNetwork, IpcacheEntry]) -> int:
        """Make the ipcache equal to ``desired``; return how many entries changed.

        New and changed prefixes are written before stale ones are deleted, so an address that moves to
        another prefix is never unknown in between.
        """
        current = dict(self._ipcache.items())
        upserts = {net: entry for net, entry in desired.items() if current.get(net) != entry}
        stale = [net for net in current if net not in desired]
        self._ipcache.update_many(upserts)
        self._ipcache.delete_many(stale)
        return len(upserts) + len(stale)

    def sync_policy(self, desired: Mapping[PolicyKey, AuthType]) -> int:
        """Make the policy map equal to ``desired``; return how many entries changed."""
        current = dict(self._policy.items())
        upserts = {key: auth_type for key, auth_type in desired.items() if current.get(key) != auth_type}
        stale = [key for key in current if key not in desired]
        self._policy.update_many(upserts)
        self._policy.delete_many(stale)
        return len(upserts) + len(stale)
