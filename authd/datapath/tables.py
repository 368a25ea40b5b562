"""The pinned maps as the auth manager sees them: auth pairs with SPIFFE IDs, desired ipcache and policy.

:class:`PinnedAuthTable` implements :class:`authd.authmanager.AuthTable` and :class:`PinnedTables`
implements :class:`authd.authmanager.DatapathTables`. They translate auth pairs (SPIFFE IDs with their
handles) to map keys, and write only differences, in batches.
"""

from __future__ import annotations

import itertools
from collections.abc import Collection, Mapping
from datetime import datetime
from typing import Protocol

import structlog

from authd.cluster.desired import AuthPair
from authd.cluster.model import IpNetwork
from authd.datapath import clock
from authd.datapath.layout import AuthType
from authd.datapath.maps import AUTH_KEY, AuthMap, IpcacheEntry, IpcacheMap, PolicyKey, PolicyMap
from authd.errors import SpiffeIdError
from authd.identity import SpiffeId

log = structlog.get_logger(__name__)

WRITE_CHUNK = 8192
"""Upserts per batch syscall, by default."""


class HandleNames(Protocol):
    """Names behind handles (implemented by :class:`authd.cluster.handles.HandleRegistry`)."""

    def identity_name(self, handle: int) -> str | None:
        """The SPIFFE ID behind an identity handle, if assigned."""
        ...

    def node_name(self, handle: int) -> str | None:
        """The node behind a node handle (this node's name for 0), if assigned."""
        ...


def _packed_key(pair: AuthPair) -> bytes:
    return AUTH_KEY.pack(pair.local_handle, pair.remote_handle, pair.node_handle, AuthType.SPIRE)


class PinnedAuthTable:
    """The auth map in terms of :class:`~authd.cluster.desired.AuthPair`."""

    def __init__(self, auth: AuthMap, names: HandleNames, write_chunk: int = WRITE_CHUNK) -> None:
        """Read and write ``auth``, naming handles through ``names``; ``write_chunk`` upserts per syscall."""
        self._auth = auth
        self._write_chunk = write_chunk
        self._names = names
        self.unresolved = 0
        # Parsed SPIFFE IDs by handle, kept across reads (the map is read on every reconcile) and checked
        # against the registry's name each time, since a released handle may come back for another ID.
        self._parsed: dict[int, tuple[str, SpiffeId | None]] = {}
        # The pair behind each packed key as of the last read and the writes since, so that a read of
        # 200k entries hands back the pair objects that already exist instead of 200k new ones (whose
        # allocation sets off full garbage collections: stalls of the whole process). Each is checked
        # against what its handles name now.
        self._pairs: dict[bytes, AuthPair] = {}

    def read(self) -> dict[AuthPair, datetime]:
        """Every SPIRE entry whose handles resolve, read from the map; the others are counted and skipped."""
        ids: dict[int, SpiffeId | None] = {}
        offset = clock.tai_offset_ns()
        pairs: dict[AuthPair, datetime] = {}
        known: dict[bytes, AuthPair] = {}
        unresolved = 0
        for key, expires in self._auth.packed_items().items():
            local, remote, node_handle, auth_type = AUTH_KEY.unpack(key)
            if auth_type != AuthType.SPIRE:
                continue
            local_id = self._identity(local, ids)
            remote_id = self._identity(remote, ids)
            node = self._names.node_name(node_handle)
            if local_id is None or remote_id is None or node is None:
                unresolved += 1
                continue
            pair = self._pairs.get(key)
            if pair is None or pair.local != local_id or pair.remote != remote_id or pair.node != node:
                pair = AuthPair(local_id, remote_id, node, local, remote, node_handle)
            known[key] = pair
            pairs[pair] = clock.from_tai_ns(expires, offset)
        self._pairs = known
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
        stale = []
        for key in self._auth.packed_items():
            local, remote, node, _auth_type = AUTH_KEY.unpack(key)
            if (
                self._identity(local, ids) is None
                or self._identity(remote, ids) is None
                or self._names.node_name(node) is None
            ):
                stale.append(key)
        if stale:
            self._auth.delete_packed(stale)
            for key in stale:
                self._pairs.pop(key, None)
            log.info("auth map entries with unknown handles deleted", count=len(stale))
        self.unresolved = 0
        return len(stale)

    def write(self, upserts: Mapping[AuthPair, datetime], deletes: Collection[AuthPair]) -> None:
        """Delete, then write; upserts in batch syscalls of ``write_chunk`` entries.

        Chunks keep each step that runs in C with the GIL held (joining keys, filling the pair cache,
        freeing the buffers) short, for writes from a worker thread while the event loop runs.
        """
        if deletes:
            keys = [_packed_key(pair) for pair in deletes]
            self._auth.delete_packed(keys)
            for key in keys:
                self._pairs.pop(key, None)
        pending = iter(upserts.items())
        while chunk := list(itertools.islice(pending, self._write_chunk)):
            packed = {_packed_key(pair): expires for pair, expires in chunk}
            self._auth.update_packed(packed)
            self._pairs.update(zip(packed, (pair for pair, _ in chunk), strict=True))


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
