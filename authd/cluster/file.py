"""The embedded cluster-state source: one TOML file that every node reads and watches.

The file's keys are declared once, below, as dataclasses decoded by the config schema (so an error names
the key path, the bad value and what is expected); ``config/cluster.example.toml`` documents every key.
Decoding problems are reported first; the cross-checks of :mod:`authd.cluster.validation` run once the
file decodes, so a dropped item never causes a second, misleading problem.

Watching: :class:`FileClusterSource` polls ``stat`` (inode, size, mtime) at a fixed interval and re-reads
the file when any of them change, which catches both an editor's atomic rename and an in-place write; a
file modified in the last :data:`RACY_SECONDS` is re-read even if its stat looks the same, because
timestamps are coarse. A read during which the file changed is discarded and retried at the next poll.
The file is opened non-blocking and anything but a regular file (a FIFO, a device, a directory) is
refused as unreadable, so nothing put at the path can stall the watcher.
A content digest makes a touch without a change a no-op. Reading and parsing run in a worker thread, so
a large file never stalls the event loop (handshake deadlines, the ring buffer).

A bad edit is logged once with every problem, counted, and leaves the last good state in force; the
source's health component says *degraded* with the reason until a good version arrives.

Writers should replace the file atomically (write a temporary file, then rename): a slow in-place writer
can be caught half-way through: a file rewritten in place is read only once unmodified for the settle time,
and a valid state that looks like a bad deploy is held back by :mod:`authd.cluster.guard`.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
import tomllib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from stat import S_ISBLK, S_ISCHR, S_ISDIR, S_ISFIFO, S_ISREG, S_ISSOCK
from typing import Any

import structlog

from authd.cluster.guard import GuardedFeed
from authd.cluster.model import (
    ClusterState,
    Encrypt,
    Endpoint,
    Enforce,
    IdentityPattern,
    Node,
    PolicyRule,
)
from authd.cluster.source import SourceStats
from authd.cluster.validation import build_state
from authd.config.model import node_name
from authd.config.schema import IpAddress, IpNetwork, decode, required, setting
from authd.errors import ClusterStateError
from authd.health import Component
from authd.identity import Selector, SpiffeId, TrustDomain, node_id

log = structlog.get_logger(__name__)

Sleep = Callable[[float], Awaitable[None]]

MAX_FILE_BYTES = 64 * 1024 * 1024
"""Refuse larger files: bounded memory whatever is put at the path (about 200k endpoints fit)."""

RACY_SECONDS = 2.0
"""A file modified this recently is re-read at the next poll even if its stat looks unchanged.

File timestamps have coarse granularity (a clock tick on Linux, seconds on some network filesystems): an
in-place write of the same size within the same tick as our read leaves the stat as it was. Until the
file is older than this, the stat alone is not trusted and the content digest decides (as git does for
"racily clean" files).
"""


def _port(value: int) -> str | None:
    return None if 1 <= value <= 65535 else "must be a port number from 1 to 65535"


def _not_empty(value: tuple[object, ...]) -> str | None:
    return None if value else "must not be empty"


def _workload_id(value: SpiffeId) -> str | None:
    return "must name a workload, not a bare trust domain" if value.is_root else None


@dataclass(frozen=True, slots=True)
class NodeTable:
    """One ``[[node]]``."""

    name: str = required("the node's name; authd finds itself by its node.name", check=node_name)
    addresses: tuple[IpAddress, ...] = required(
        "addresses peers dial for attestation, most preferred first", check=_not_empty
    )
    spiffe_id: SpiffeId | None = setting(
        None, "the SPIFFE ID authd on this node runs as (default spiffe://<trust_domain>/authd/<name>)"
    )
    attest_port: int | None = setting(None, "this node's attestation port, if not the default", check=_port)
    agent_id: SpiffeId | None = setting(
        None, "SPIFFE ID of the node's SPIRE agent (default spiffe://<td>/spire/agent/<name>)"
    )


@dataclass(frozen=True, slots=True)
class EndpointTable:
    """One ``[[endpoint]]``."""

    spiffe_id: SpiffeId = required("the workload's SPIFFE ID", check=_workload_id)
    node: str = required("the name of the node hosting it")
    prefixes: tuple[IpNetwork, ...] = required("its addresses or prefixes", check=_not_empty)
    selectors: tuple[Selector, ...] = required(
        "the SPIRE selectors of the workload on its node", check=_not_empty
    )


@dataclass(frozen=True, slots=True)
class PolicyTable:
    """One ``[[policy]]``."""

    source: IdentityPattern = required("who sends: an identity pattern")
    destination: IdentityPattern = required("who receives: an identity pattern")
    enforce: Enforce = setting("ingress", "where it is checked: ingress, egress or both")
    encrypt: Encrypt = setting(
        "none", 'what else it needs: "none", or "ktls" (kernel TLS per TCP connection)'
    )


@dataclass(frozen=True, slots=True)
class ClusterFile:
    """The whole cluster file."""

    trust_domain: TrustDomain | None = setting(None, "trust domain of node IDs derived from node names")
    node: tuple[NodeTable, ...] = setting((), "the nodes running authd")
    endpoint: tuple[EndpointTable, ...] = setting((), "the workloads")
    policy: tuple[PolicyTable, ...] = setting((), "which traffic requires authentication")


def parse_cluster(text: str, *, source: str = "<cluster>") -> ClusterState:
    """Validate TOML text as cluster state; raise ClusterStateError listing every problem."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ClusterStateError(
            f"cluster: {source} is not valid TOML", [f"{source}: not valid TOML: {err}"]
        ) from err
    return state_from_tables(data, source=source)


def state_from_tables(data: Mapping[str, Any], *, source: str) -> ClusterState:
    """Validate the cluster file's tables, however they were stored (TOML, or etcd's JSON values)."""
    problems: list[str] = []
    decoded = decode(ClusterFile, data, problems)
    nodes = []
    for index, table in enumerate(decoded.node):
        spiffe_id = table.spiffe_id
        if spiffe_id is None:
            if decoded.trust_domain is None:
                problems.append(
                    f"node[{index}].spiffe_id: missing: set it, or set the top-level trust_domain "
                    "to use spiffe://<trust_domain>/authd/<name>"
                )
                continue
            spiffe_id = node_id(decoded.trust_domain, table.name)
        nodes.append(Node(table.name, table.addresses, spiffe_id, table.attest_port, table.agent_id))
    if problems:
        raise ClusterStateError(f"cluster: {len(problems)} problem(s) in {source}", problems)
    endpoints = [Endpoint(e.spiffe_id, e.node, e.prefixes, e.selectors) for e in decoded.endpoint]
    rules = [PolicyRule(p.source, p.destination, p.enforce, p.encrypt) for p in decoded.policy]
    try:
        return build_state(nodes, endpoints, rules)
    except ClusterStateError as err:
        raise ClusterStateError(f"cluster: {len(err.problems)} problem(s) in {source}", err.problems) from err


def load_cluster(path: Path) -> ClusterState:
    """Read and validate the cluster file at ``path``."""
    try:
        content, _ = _read(path)
    except _InFlux as err:
        raise ClusterStateError(f"cluster: {path} changed while being read; try again") from err
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ClusterStateError(
            f"cluster: {path} is not UTF-8 text", [f"{path}: not UTF-8 text: {err}"]
        ) from err
    return parse_cluster(text, source=str(path))


Signature = tuple[int, int, int, int]
"""What a stat says about the file's version: (device, inode, size, mtime in ns)."""


def _signature(stat: os.stat_result) -> Signature:
    return (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)


def _read(path: Path) -> tuple[bytes, Signature]:
    """Read the file whole, with the signature it had throughout; raise ClusterStateError if unreadable.

    The file is opened non-blocking and refused unless it is a regular file: opening or reading a FIFO,
    a character device or a socket could block for ever, and no such thing is a cluster file anyway.
    The signature is taken from the open file before and after reading: if they differ the file was
    written while being read, and the caller should try again later.
    """
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except FileNotFoundError as err:
        raise ClusterStateError(f"cluster: {path} does not exist") from err
    except OSError as err:
        raise ClusterStateError(f"cluster: cannot read {path}: {err.strerror or err}") from err
    stat = os.fstat(descriptor)
    if not S_ISREG(stat.st_mode):
        os.close(descriptor)
        raise ClusterStateError(f"cluster: cannot read {path}: not a regular file ({_kind(stat)})")
    try:
        with os.fdopen(descriptor, "rb") as file:
            before = _signature(stat)
            if before[2] > MAX_FILE_BYTES:
                raise ClusterStateError(f"cluster: {path} is larger than {MAX_FILE_BYTES} bytes")
            content = file.read(MAX_FILE_BYTES + 1)
            after = _signature(os.fstat(file.fileno()))
    except OSError as err:
        raise ClusterStateError(f"cluster: cannot read {path}: {err.strerror or err}") from err
    if len(content) > MAX_FILE_BYTES:
        raise ClusterStateError(f"cluster: {path} is larger than {MAX_FILE_BYTES} bytes")
    if before != after or len(content) != after[2]:
        raise _InFlux
    return content, after


def _kind(stat: os.stat_result) -> str:
    """What a non-regular file is, for the refusal."""
    mode = stat.st_mode
    if S_ISDIR(mode):
        return "a directory"
    if S_ISFIFO(mode):
        return "a FIFO"
    if S_ISSOCK(mode):
        return "a socket"
    if S_ISCHR(mode) or S_ISBLK(mode):
        return "a device"
    return "not a plain file"


class _InFlux(Exception):  # noqa: N818 - internal signal
    """The file changed while it was read."""


@dataclass(slots=True)
class _Unchanged:
    """Nothing to do: the stat is trusted and unchanged, or a writer is busy."""


@dataclass(slots=True)
class _Unreadable:
    """The file cannot be read, and why."""

    reason: str


@dataclass(slots=True)
class _Version:
    """A version of the file that was read: parsed into ``state``, or ``problems`` (unless already seen).

    ``trusted``: old enough that an unchanged stat means unchanged content (see RACY_SECONDS).
    """

    signature: Signature
    digest: bytes
    trusted: bool
    state: ClusterState | None = None
    problems: list[str] = field(default_factory=list)


class FileClusterSource:
    """A :class:`~authd.cluster.source.ClusterSource` backed by one polled TOML file."""

    def __init__(
        self,
        path: Path,
        local_node: str,
        health: Component,
        *,
        poll_interval: float = 1.0,
        settle: float = 2.0,
        max_endpoint_removal: float = 1.0,
        sleep: Sleep = asyncio.sleep,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """Watch ``path``; ``local_node`` is this node's name, looked for in every version.

        ``settle``: an in-place write is read only once the file has not been modified for this many
        seconds (a new inode, an atomic rename, is read at once); ``max_endpoint_removal``: see
        :mod:`authd.cluster.guard`.
        """
        self.path = path
        self.local_node = local_node
        self.stats = SourceStats()
        self._health = health
        self._interval = poll_interval
        self._settle_time = settle
        self._sleep = sleep
        self._clock = clock
        self._feed = GuardedFeed(local_node, max_endpoint_removal=max_endpoint_removal, origin=str(path))
        self._seen: Signature | None = None  # the signature trusted to mean "nothing changed since"
        self._last_read: Signature | None = None  # the signature of the last version read, good or bad
        self._digest = b""  # the content digest of that version
        self._unreadable = ""  # why the file cannot be read, while it cannot

    def current(self) -> ClusterState | None:
        """The state in force, or None before the first good version."""
        return self._feed.current()

    def snapshots(self) -> AsyncIterator[ClusterState]:
        """The state in force, then each newer one (see :class:`~authd.cluster.source.StateFeed`)."""
        return self._feed.feed.snapshots()

    def accept(self) -> ClusterState:
        """Apply the state the deploy guard holds back; raise LookupError if none is."""
        state = self._feed.accept()
        self._published(state)
        return state

    async def run(self) -> None:
        """Poll the file until cancelled; reading and parsing run in a thread, off the event loop."""
        while True:
            self._settle(await asyncio.to_thread(self._examine))
            await self._sleep(self._interval)

    def poll(self) -> bool:
        """Look at the file once and apply a new good version; return whether the state in force changed."""
        return self._settle(self._examine())

    def _examine(self) -> _Unchanged | _Unreadable | _Version:
        """Read and parse the file if it changed; touches no state, so it may run in a thread."""
        try:
            signature = _signature(self.path.stat())
        except OSError as err:
            return _Unreadable(f"cluster: cannot stat {self.path}: {err.strerror or err}")
        if signature == self._seen or self._unsettled(signature):
            return _Unchanged()
        try:
            content, signature = _read(self.path)
        except _InFlux:
            return _Unchanged()  # a writer is busy; the next poll sees the finished file
        except ClusterStateError as err:
            return _Unreadable(str(err))
        racy = self._clock() - signature[3] / 1e9 < RACY_SECONDS
        version = _Version(signature, hashlib.sha256(content).digest(), trusted=not racy)
        if version.digest == self._digest:
            return version
        try:
            version.state = parse_cluster(content.decode("utf-8"), source=str(self.path))
        except UnicodeDecodeError as err:
            version.problems = [f"{self.path}: not UTF-8 text: {err}"]
        except ClusterStateError as err:
            version.problems = err.problems or [str(err)]
        return version

    def _unsettled(self, signature: Signature) -> bool:
        """Whether the file was rewritten in place (same inode) too recently to be sure the writer is done.

        A new inode is an atomic rename (or a new file) and is read at once.
        """
        return (
            self._last_read is not None
            and signature[:2] == self._last_read[:2]
            and self._clock() - signature[3] / 1e9 < self._settle_time
        )

    def _settle(self, outcome: _Unchanged | _Unreadable | _Version) -> bool:
        """Apply what :meth:`_examine` found: publish, log, count, report health."""
        if isinstance(outcome, _Unchanged):
            return False
        if isinstance(outcome, _Unreadable):
            self._cannot_read(outcome.reason)
            return False
        self._unreadable = ""
        changed_stat = outcome.signature != self._last_read
        self._last_read = outcome.signature
        self._seen = outcome.signature if outcome.trusted else None
        if outcome.digest == self._digest:
            if changed_stat:
                self.stats.unchanged += 1
            self._report_health()
            return False
        self._digest = outcome.digest
        if outcome.state is None:
            self._reject(outcome.problems)
            return False
        return self._apply(outcome.state)

    def _apply(self, state: ClusterState) -> bool:
        self.stats.problems = []
        outcome = self._feed.offer(state)
        self._feed.note_held(self.stats)
        if outcome != "applied":
            if outcome == "unchanged":
                self.stats.unchanged += 1
            self._report_health()
            return False
        self._published(state)
        return True

    def _published(self, state: ClusterState) -> None:
        self._feed.note_held(self.stats)
        self.stats.applied += 1
        self.stats.version = state.version
        log.info(
            "cluster state applied",
            path=str(self.path),
            version=state.version[:12],
            nodes=len(state.nodes),
            endpoints=len(state.endpoints),
            rules=len(state.rules),
        )
        if state.node(self.local_node) is None:
            log.warning("this node is not in cluster state", node=self.local_node, path=str(self.path))
        self._report_health()

    def _reject(self, problems: list[str]) -> None:
        self.stats.rejected += 1
        self.stats.problems = list(problems)
        current = self._feed.current()
        log.error(
            "cluster state rejected, keeping the last good state",
            path=str(self.path),
            problems=problems,
            kept_version=current.version[:12] if current else None,
        )
        self._report_health()

    def _cannot_read(self, reason: str) -> None:
        if reason != self._unreadable:
            # Logged and counted once per distinct failure, not once per poll.
            self.stats.read_errors += 1
            current = self._feed.current()
            log.error(
                "cluster state file unreadable, keeping the last good state",
                path=str(self.path),
                error=reason,
                kept_version=current.version[:12] if current else None,
            )
        self._unreadable = reason
        self._seen = self._last_read = None
        self._report_health()

    def _report_health(self) -> None:
        self._feed.report_health(self._health, self.stats.problems, failure=self._unreadable)
