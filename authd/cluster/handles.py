"""Identity and node handles: the small integers the BPF maps use instead of SPIFFE IDs and node names.

Handles are node-local: authd on each node assigns its own, so no cluster-wide allocator is needed. They
must survive restarts, because the pinned maps outlive the process and hold handles: a handle that came
back meaning a different identity would turn an old auth entry into a grant for the wrong workload. So
every assignment is written to one state file (JSON, replaced atomically and fsynced) *before* it is
returned, and a handle is given out again only after :meth:`HandleRegistry.release`, which its owner
calls once the pinned maps no longer hold it.

Identity handles: 0 is the unknown identity (the world), 1-255 are reserved, workloads get 256 and up.
:data:`ANY` (0xFFFFFFFF) is the datapath's wildcard and never assigned. Node handles: 0 is this node,
remote nodes get 1 and up. Allocation takes the lowest free handle, so handles stay dense.

Recovery: a state file that cannot be parsed, or that breaks the rules above, is moved aside to
``<name>.corrupt`` and the registry starts empty with :attr:`HandleRegistry.fresh` set: garbage bytes,
text that is not UTF-8 or not JSON, a truncated or empty file, the wrong types, handles out of range or
assigned twice. A fresh registry means every handle-keyed entry already in the pinned maps (ipcache,
policy, auth) is meaningless and must be flushed before new entries are written. A state file that exists
but cannot be read (permissions, a directory in its place, I/O error) is not guessed around: loading
raises ClusterStateError, whose message says what to fix or remove, and the daemon does not start.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import structlog

from authd.errors import ClusterStateError, SpiffeIdError
from authd.identity import SpiffeId

log = structlog.get_logger(__name__)

WORLD = 0
"""The identity handle of addresses not in cluster state."""
FIRST_IDENTITY = 256
"""The lowest identity handle given to a workload; 1-255 are reserved."""
ANY = 0xFFFF_FFFF
"""The datapath's wildcard identity; never assigned."""
LAST_HANDLE = ANY - 1
LOCAL_NODE = 0
"""The node handle of this node."""
FIRST_NODE = 1

FORMAT = 1
STATE_FILE = "handles.json"


class HandleRegistry:
    """Node-local handles for identities and nodes, persisted in one state file."""

    def __init__(
        self,
        path: Path | None,
        local_node: str,
        identities: Mapping[SpiffeId, int] | None = None,
        nodes: Mapping[str, int] | None = None,
        *,
        fresh: bool = True,
    ) -> None:
        """Hold the given assignments (already validated); use :meth:`open` to load from disk.

        With ``path`` None nothing is persisted: for dry runs and benchmarks, never for the daemon.
        """
        self.path = path
        self.local_node = local_node
        self.fresh = fresh
        self._identities: dict[SpiffeId, int] = dict(identities or {})
        self._nodes: dict[str, int] = dict(nodes or {})
        self._identity_names = {handle: str(spiffe_id) for spiffe_id, handle in self._identities.items()}
        self._node_names = {handle: name for name, handle in self._nodes.items()}

    @classmethod
    def open(cls, path: Path, local_node: str) -> HandleRegistry:
        """Load the registry from ``path``; a missing or corrupt file gives a fresh, empty registry."""
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            log.info("no identity handle state yet, starting fresh", path=str(path))
            return cls(path, local_node)
        except OSError as err:
            raise ClusterStateError(
                f"handles: cannot read state file {path}: {err.strerror or err}; fix its permissions, or"
                " remove it (authd then starts with fresh handles and rewrites the pinned maps)"
            ) from err
        try:
            identities, nodes = _parse(data)
        except ClusterStateError as err:
            aside = path.with_name(path.name + ".corrupt")
            try:
                path.replace(aside)
            except OSError as move_err:
                raise ClusterStateError(
                    f"handles: state file {path} is corrupt ({err}) and cannot be moved aside: {move_err}"
                ) from move_err
            log.error(
                "identity handle state corrupt, moved aside and starting fresh; pinned maps must be flushed",
                path=str(path),
                moved_to=str(aside),
                error=str(err),
            )
            return cls(path, local_node)
        return cls(path, local_node, identities, nodes, fresh=False)

    @classmethod
    def read_only(cls, path: Path, local_node: str) -> HandleRegistry:
        """Load ``path`` to look names up (``authd bpf ... list``); never moves or writes anything.

        Raises ClusterStateError when the file is missing, unreadable or invalid.
        """
        try:
            data = path.read_bytes()
        except OSError as err:
            raise ClusterStateError(f"handles: cannot read state file {path}: {err.strerror or err}") from err
        identities, nodes = _parse(data)
        return cls(None, local_node, identities, nodes, fresh=False)

    # ---------------------------------------------------------------------------------------- lookups

    def identity_handle(self, spiffe_id: SpiffeId) -> int | None:
        """The handle assigned to ``spiffe_id``, if any."""
        return self._identities.get(spiffe_id)

    def node_handle(self, name: str) -> int | None:
        """The handle of node ``name``: 0 for this node, else the one assigned, if any."""
        if name == self.local_node:
            return LOCAL_NODE
        return self._nodes.get(name)

    def identity_name(self, handle: int) -> str | None:
        """The SPIFFE ID behind an identity handle; None for the world, ANY and unassigned handles."""
        return self._identity_names.get(handle)

    def node_name(self, handle: int) -> str | None:
        """The node behind a node handle: this node's name for 0; None if unassigned."""
        if handle == LOCAL_NODE:
            return self.local_node
        return self._node_names.get(handle)

    @property
    def identities(self) -> Mapping[SpiffeId, int]:
        """Every assigned identity handle (the GC compares it with cluster state and the maps)."""
        return dict(self._identities)

    @property
    def nodes(self) -> Mapping[str, int]:
        """Every assigned remote node handle."""
        return dict(self._nodes)

    # ----------------------------------------------------------------------------------------- changes

    def assign(self, identities: Iterable[SpiffeId] = (), nodes: Iterable[str] = ()) -> bool:
        """Give a handle to each identity and node that has none, persisting before returning.

        Returns whether anything was assigned. This node's name is skipped (it is always 0). If the state
        file cannot be written nothing is assigned and ClusterStateError is raised: a handle used in the
        maps but not on disk could mean another identity after a restart.
        """
        new_identities = dict(self._identities)
        new_nodes = dict(self._nodes)
        used_identities = set(new_identities.values())
        used_nodes = set(new_nodes.values())
        identity_cursor, node_cursor = FIRST_IDENTITY, FIRST_NODE
        for spiffe_id in sorted(set(identities)):
            if spiffe_id not in new_identities:
                identity_cursor = _lowest_free(used_identities, identity_cursor, "identity")
                new_identities[spiffe_id] = identity_cursor
                used_identities.add(identity_cursor)
        for name in sorted(set(nodes)):
            if name != self.local_node and name not in new_nodes:
                node_cursor = _lowest_free(used_nodes, node_cursor, "node")
                new_nodes[name] = node_cursor
                used_nodes.add(node_cursor)
        if new_identities == self._identities and new_nodes == self._nodes:
            return False
        self._commit(new_identities, new_nodes)
        return True

    def release(self, identities: Iterable[SpiffeId] = (), nodes: Iterable[str] = ()) -> bool:
        """Free the handles of ``identities`` and ``nodes``; only call once no pinned map holds them.

        Returns whether anything was released. Unknown names are ignored; the local node is never assigned.
        """
        drop_identities = set(identities) & self._identities.keys()
        drop_nodes = set(nodes) & self._nodes.keys()
        if not drop_identities and not drop_nodes:
            return False
        self._commit(
            {k: v for k, v in self._identities.items() if k not in drop_identities},
            {k: v for k, v in self._nodes.items() if k not in drop_nodes},
        )
        return True

    def _commit(self, identities: dict[SpiffeId, int], nodes: dict[str, int]) -> None:
        if self.path is not None:
            _write_atomically(self.path, _render(identities, nodes))
        self._identities, self._nodes = identities, nodes
        self._identity_names = {handle: str(spiffe_id) for spiffe_id, handle in identities.items()}
        self._node_names = {handle: name for name, handle in nodes.items()}


def _lowest_free(used: set[int], start: int, kind: str) -> int:
    """The lowest handle at or above ``start`` not in ``used``; callers pass the last one they took."""
    handle = start
    while handle in used:
        handle += 1
    if handle > LAST_HANDLE:
        raise ClusterStateError(f"handles: no free {kind} handle left")
    return handle


def _render(identities: Mapping[SpiffeId, int], nodes: Mapping[str, int]) -> bytes:
    document = {
        "format": FORMAT,
        "identities": {str(k): v for k, v in sorted(identities.items(), key=lambda item: item[1])},
        "nodes": dict(sorted(nodes.items(), key=lambda item: item[1])),
    }
    return (json.dumps(document, indent=1) + "\n").encode()


def _parse(data: bytes) -> tuple[dict[SpiffeId, int], dict[str, int]]:
    """Parse and check a state file; raise ClusterStateError naming the first thing wrong.

    Whatever the bytes are (not UTF-8, not JSON, nested too deep to parse, the wrong shape), the
    answer is this one error, which :meth:`HandleRegistry.open` treats as corruption.
    """
    try:
        document = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise ClusterStateError(f"handles: not UTF-8: {err}") from err
    except json.JSONDecodeError as err:
        raise ClusterStateError(f"handles: not JSON: {err}") from err
    except RecursionError as err:
        raise ClusterStateError("handles: JSON nested too deep") from err
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise ClusterStateError(f"handles: not a format {FORMAT} handle state file")
    raw_identities, raw_nodes = document.get("identities"), document.get("nodes")
    if not isinstance(raw_identities, dict) or not isinstance(raw_nodes, dict):
        raise ClusterStateError('handles: "identities" and "nodes" must be objects')
    identities: dict[SpiffeId, int] = {}
    for text_id, handle in raw_identities.items():
        try:
            spiffe_id = SpiffeId.parse(text_id)
        except SpiffeIdError as err:
            raise ClusterStateError(f"handles: bad identity {text_id!r}: {err}") from err
        identities[spiffe_id] = _checked(handle, FIRST_IDENTITY, f"identity {text_id}")
    nodes = {name: _checked(handle, FIRST_NODE, f"node {name}") for name, handle in raw_nodes.items()}
    for kind, assigned in (("identity", list(identities.values())), ("node", list(nodes.values()))):
        if len(set(assigned)) != len(assigned):
            raise ClusterStateError(f"handles: one {kind} handle is assigned twice")
    return identities, nodes


def _checked(handle: object, lowest: int, what: str) -> int:
    if isinstance(handle, bool) or not isinstance(handle, int) or not lowest <= handle <= LAST_HANDLE:
        raise ClusterStateError(f"handles: {what} has handle {handle!r}, outside {lowest}..{LAST_HANDLE}")
    return handle


def _write_atomically(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves the old file or the new one, never a mix."""
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        temporary.replace(path)
        directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(directory)  # the rename itself must be durable before the handles are used
        finally:
            os.close(directory)
    except OSError as err:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise ClusterStateError(f"handles: cannot write state file {path}: {err.strerror or err}") from err
