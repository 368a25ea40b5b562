"""The deploy guard: a valid state that looks like a bad deploy is held back until an operator confirms it.

Validation (:mod:`authd.cluster.validation`) refuses content that is inconsistent. Some consistent content
is still almost certainly a mistake, and applying it stops traffic on every node at once: an empty file
written atomically, a file truncated after its ``[[node]]`` tables, an etcd prefix wiped by a wrong
``del --prefix``. Both sources therefore pass each new valid state through :class:`GuardedFeed`, which
holds it back when, compared with the state in force,

- the local node is no longer listed (it was before): this node would stop enforcing for its workloads;
- more than ``max_endpoint_removal`` of the endpoints are gone at once, or every one of them is (the
  default share, 1.0, holds back only a state that removes every endpoint).

The first state a source reads is never held: there is nothing to compare it with. While a state is held,
the last good one stays in force, the refusal is logged once, counted and shown in metrics and health,
until either a later version arrives that passes the guard (the held one is dropped) or an operator runs
``authd cluster accept``, which applies exactly the held version.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

import structlog

from authd.cluster.model import ClusterState
from authd.cluster.source import SourceStats, StateFeed
from authd.control import Request, Response
from authd.errors import ControlError
from authd.health import Component

log = structlog.get_logger(__name__)


def hold_reason(
    previous: ClusterState | None, new: ClusterState, *, local_node: str, max_endpoint_removal: float
) -> str | None:
    """Why ``new`` must wait for an operator, or None if it may replace ``previous`` at once."""
    if previous is None:
        return None
    if previous.node(local_node) is not None and new.node(local_node) is None:
        return f'it no longer lists this node "{local_node}"'
    before = _endpoint_keys(previous)
    if not before:
        return None
    removed = len(before - _endpoint_keys(new))
    if removed == len(before):
        return f"it removes every endpoint ({removed})"
    if removed > max_endpoint_removal * len(before):
        return (
            f"it removes {removed} of {len(before)} endpoints, more than the "
            f"{max_endpoint_removal:.0%} allowed at once (cluster.max_endpoint_removal)"
        )
    return None


def _endpoint_keys(state: ClusterState) -> set[tuple[str, str]]:
    """Endpoints as (identity, node): moving an endpoint's addresses is not a removal."""
    return {(str(endpoint.spiffe_id), endpoint.node) for endpoint in state.endpoints}


@dataclass(frozen=True, slots=True)
class Held:
    """A valid state the guard holds back, and why."""

    state: ClusterState
    reason: str


Outcome = str
"""What :meth:`GuardedFeed.offer` did: ``"applied"``, ``"unchanged"`` or ``"held"``."""


class GuardedFeed:
    """A :class:`~authd.cluster.source.StateFeed` whose new states pass the deploy guard first."""

    def __init__(self, local_node: str, *, max_endpoint_removal: float, origin: str) -> None:
        """Guard for ``local_node``; ``origin`` names the source in logs (a path, an etcd prefix)."""
        self.feed = StateFeed()
        self.held: Held | None = None
        self.holds = 0
        """States held back since start."""
        self._local_node = local_node
        self._max_removal = max_endpoint_removal
        self._origin = origin

    def current(self) -> ClusterState | None:
        """The state in force."""
        return self.feed.current()

    def offer(self, state: ClusterState) -> Outcome:
        """Apply a valid ``state`` unless the guard holds it back; a good state drops any held one."""
        previous = self.feed.current()
        if previous is not None and previous.version == state.version:
            self._release()
            return "unchanged"
        reason = hold_reason(
            previous, state, local_node=self._local_node, max_endpoint_removal=self._max_removal
        )
        if reason is not None:
            if self.held is None or self.held.state.version != state.version:
                self.holds += 1
                log.error(
                    "cluster state held back until `authd cluster accept`, keeping the last good state",
                    origin=self._origin,
                    reason=reason,
                    held_version=state.version[:12],
                    kept_version=previous.version[:12] if previous else None,
                )
            self.held = Held(state, reason)
            return "held"
        self._release()
        self.feed.publish(state)
        return "applied"

    def accept(self) -> ClusterState:
        """Apply the held state (the operator's confirmation); raise LookupError if nothing is held."""
        held = self.held
        if held is None:
            raise LookupError("cluster: no cluster state is held back")
        self.held = None
        log.warning(
            "held cluster state accepted by the operator",
            origin=self._origin,
            reason=held.reason,
            version=held.state.version[:12],
        )
        self.feed.publish(held.state)
        return held.state

    def note_held(self, stats: SourceStats) -> None:
        """Copy the hold count and the held version, if any, into a source's ``stats``."""
        stats.holds = self.holds
        stats.held_reason = self.held.reason if self.held else ""
        stats.held_version = self.held.state.version if self.held else ""

    def report_health(
        self, health: Component, problems: list[str], *, failure: str = "", in_force: str = ""
    ) -> None:
        """Say in ``health`` how the source stands, the same way for every source.

        Degraded, in this order: the source cannot be read (``failure``), a state is held back, the latest
        version was rejected (``problems``), no state yet, this node not listed. Ready otherwise, with
        the version in force and ``in_force`` after it. Every degraded reason names the version kept.
        """
        current = self.feed.current()
        kept = f"; keeping version {current.version[:12]}" if current else ""
        if failure:
            health.degraded(f"{failure}{kept}")
        elif self.held is not None:
            health.degraded(
                f"{self._origin} version {self.held.state.version[:12]} held back: {self.held.reason}; "
                f"`authd cluster accept` applies it{kept}"
            )
        elif problems:
            health.degraded(
                f"{self._origin} rejected ({len(problems)} problem(s), first: {problems[0]}){kept}"
            )
        elif current is None:
            health.degraded(f"no cluster state read from {self._origin} yet")
        elif current.node(self._local_node) is None:
            health.degraded(f'this node "{self._local_node}" is not in cluster state {self._origin}')
        else:
            health.ready(f"version {current.version[:12]}{in_force}")

    def _release(self) -> None:
        if self.held is not None:
            version = self.held.state.version[:12]
            log.info("held cluster state superseded", origin=self._origin, version=version)
            self.held = None


class Acceptor(Protocol):
    """A source with a deploy guard: what the ``cluster-accept`` control op needs."""

    def accept(self) -> ClusterState:
        """Apply the held state; raise LookupError if none is held."""
        ...

    @property
    def stats(self) -> SourceStats:
        """The source's counters, with the held version."""
        ...


async def serve_accept(source: Acceptor, request: Request) -> AsyncIterator[Response]:
    """The ``cluster-accept`` op: apply the held state, only if it is the version the operator named."""
    version = request.get("version")
    held = source.stats.held_version
    if not held:
        raise ControlError("cluster: no cluster state is held back; nothing to accept")
    if isinstance(version, str) and version and not held.startswith(version):
        raise ControlError(f"cluster: the held version is {held[:12]}, not {version}; nothing accepted")
    try:
        state = source.accept()
    except LookupError as err:
        raise ControlError(str(err)) from err
    yield {"accepted": state.version[:12], "nodes": len(state.nodes), "endpoints": len(state.endpoints)}
