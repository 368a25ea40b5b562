"""Which remote identities are attested when: the cache of results and the schedule that keeps it fresh.

The unit is a :class:`Peer`, one remote identity at one remote node; every local identity that policy
pairs with it shares the one result, so handshakes grow with identities, never with pairs.

A peer is attested
- as soon as it is wanted (cluster state shows policy pairing it with a local identity),
- on demand, when the datapath reports traffic waiting for it (unless a valid result exists or an
  attempt is in flight): this pulls a retry that backoff put far off forward, but never to less than
  :data:`ON_DEMAND_INTERVAL` after the previous attempt, so traffic waiting on a node that is down or
  refusing costs it at most one handshake per peer per interval,
- again at ``renew_after`` of its SVID's lifetime (SPIRE rotates at about half), and, while it presents
  the same certificate, again with backoff until it presents the rotated one, so no entry lapses while
  both SVIDs are valid and SPIRE is healthy,
- again at once when a bundle change makes its remembered chain fail verification.
A failed attempt is retried with per-peer backoff. A transient failure (unreachable, timeout) keeps the
last result until it expires; an answer (not hosted, wrong identity, bad chain) drops it at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
from collections import Counter
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Protocol

import structlog

from authd.attest.client import TRANSIENT, Attestation, Target
from authd.backoff import Backoff, BackoffFactory
from authd.errors import AttestError, SvidError
from authd.identity import SpiffeId
from authd.x509svid import BundleSet

log = structlog.get_logger(__name__)

ON_DEMAND_INTERVAL = timedelta(seconds=1)
"""The shortest time between two attempts for one peer when traffic asks for it (the TCP SYN
retransmission timeout: the next retransmitted SYN is the first packet that can benefit)."""


@dataclass(frozen=True, slots=True, order=True)
class Peer:
    """One remote identity at one remote node."""

    remote_id: SpiffeId
    node: str


class AttestClient(Protocol):
    """Runs one attestation (the attestation client)."""

    async def attest(self, target: Target) -> Attestation:
        """Prove the target or raise AttestError."""
        ...


@dataclass
class _PeerState:
    target: Target
    backoff: Backoff
    result: Attestation | None = None
    due: datetime | None = None
    in_flight: bool = False
    refused: bool = False
    last_failure: str = ""
    attempted_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class PeerStatus:
    """What ``authd status`` shows of one wanted peer: its valid result, if any, and its last failure.

    ``last_failure`` is the reason of the latest failed attempt, "" once an attempt has succeeded since.
    """

    peer: Peer
    result: Attestation | None
    refused: bool
    last_failure: str
    in_flight: bool


@dataclass
class ScheduleStats:
    """Attempts by outcome ("ok", "rotated-not-yet" or a failure reason)."""

    attempts: Counter[str] = field(default_factory=Counter)


class Attestations:
    """Keeps an attestation for every wanted peer, renewing and retrying on schedule."""

    def __init__(
        self,
        client: AttestClient,
        *,
        renew_after: float,
        backoff: BackoffFactory,
        max_in_flight: int,
        on_change: Callable[[Collection[Peer]], None],
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
        on_demand_interval: timedelta = ON_DEMAND_INTERVAL,
    ) -> None:
        """``on_change`` is called with the peers whose result appeared, changed or went away."""
        self._client = client
        self._renew_after = renew_after
        self._backoff = backoff
        self._max_in_flight = max_in_flight
        self._on_change = on_change
        self._now = now
        self._on_demand_interval = on_demand_interval
        self._peers: dict[Peer, _PeerState] = {}
        self._queue: list[tuple[datetime, Peer]] = []
        self._wake = asyncio.Event()
        self._in_flight = 0
        self.stats = ScheduleStats()

    # ------------------------------------------------------------------ what the auth manager calls

    def want(self, targets: Mapping[Peer, Target]) -> None:
        """Set the peers to keep attested; new ones are due now, dropped ones are forgotten."""
        gone = [peer for peer in self._peers if peer not in targets]
        dropped = [peer for peer in gone if self._peers.pop(peer).result is not None]
        now = self._now()
        for peer, target in targets.items():
            state = self._peers.get(peer)
            if state is None:
                self._peers[peer] = _PeerState(target, self._backoff())
                self._schedule(peer, now)
            elif state.target != target:
                # The node's addresses or port changed. A valid result stays (the identity was proved,
                # wherever); a peer still waiting for one is asked at its new address now, not after
                # the backoff that its old address earned.
                state.target = target
                if self.result(peer) is None and not state.in_flight:
                    state.backoff.reset()
                    self._schedule(peer, now)
        if dropped:
            self._on_change(dropped)

    def request(self, peer: Peer) -> bool:
        """Attest ``peer`` soon unless a valid result exists or an attempt is in flight.

        True if this brought the next attempt forward: to now, or to ``on_demand_interval`` (default
        :data:`ON_DEMAND_INTERVAL`) after the previous attempt, whichever is later.
        """
        state = self._peers.get(peer)
        if state is None or state.in_flight or self.result(peer) is not None:
            return False
        now = self._now()
        due = now
        if state.attempted_at is not None:
            due = max(now, state.attempted_at + self._on_demand_interval)
        if state.due is not None and state.due <= due:
            return False  # already due by then; the loop is on it
        self._schedule(peer, due)
        return True

    def result(self, peer: Peer) -> Attestation | None:
        """The valid attestation of ``peer``, if any."""
        state = self._peers.get(peer)
        if state is None or state.result is None or state.result.not_after <= self._now():
            return None
        return state.result

    def results(self) -> dict[Peer, Attestation]:
        """Every valid attestation."""
        now = self._now()
        return {
            peer: state.result
            for peer, state in self._peers.items()
            if state.result is not None and state.result.not_after > now
        }

    def peers(self) -> list[PeerStatus]:
        """Every wanted peer, sorted, with its valid result and its last failure."""
        return [
            PeerStatus(peer, self.result(peer), state.refused, state.last_failure, state.in_flight)
            for peer, state in sorted(self._peers.items())
        ]

    def refused(self, peer: Peer) -> bool:
        """Whether the last attempt for ``peer`` was answered with a refusal (not hosted, not it)."""
        state = self._peers.get(peer)
        return state is not None and state.refused

    def bundles_changed(self, bundles: BundleSet) -> None:
        """Re-verify every remembered chain against new bundles; drop and re-attest those that fail."""
        now = self._now()
        dropped = []
        for peer, state in self._peers.items():
            if state.result is None:
                continue
            try:
                state.result.reverify(bundles, now)
            except SvidError as err:
                log.warning(
                    "attestation no longer verifies", peer=str(peer.remote_id), node=peer.node, rule=err.rule
                )
                state.result = None
                dropped.append(peer)
                self._schedule(peer, now)
        if dropped:
            self._on_change(dropped)

    # ------------------------------------------------------------------------------------ the loop

    async def run(self) -> None:
        """Run due attestations, at most ``max_in_flight`` at once, until cancelled.

        The supervisor restarts this job if an attempt fails unexpectedly (anything but AttestError ends
        the task group). The attempts of the previous run are over by then, or never began because the
        group was already shutting down: their peers are due again now, instead of staying "in flight"
        with no next attempt, never to be attested again.
        """
        self._reschedule_orphans()
        async with asyncio.TaskGroup() as attempts:
            while True:
                self._wake.clear()
                now = self._now()
                while self._queue and self._in_flight < self._max_in_flight and self._queue[0][0] <= now:
                    due, peer = heapq.heappop(self._queue)
                    state = self._peers.get(peer)
                    if state is None or state.due != due or state.in_flight:
                        continue  # stale queue entry: rescheduled, dropped, or running
                    state.in_flight = True
                    state.due = None
                    state.attempted_at = now
                    self._in_flight += 1
                    attempts.create_task(self._attempt(peer, state))
                timeout = None
                if self._queue and self._in_flight < self._max_in_flight:
                    timeout = max((self._queue[0][0] - now).total_seconds(), 0.0)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout)

    def _reschedule_orphans(self) -> None:
        """Make due now every peer the previous run left without a next attempt.

        Every attempt that ends through ``_succeeded`` or ``_failed`` schedules the next one; an attempt
        that raised something else, was cancelled, or never began leaves its peer with none.
        """
        self._in_flight = 0
        now = self._now()
        for peer, state in self._peers.items():
            if state.in_flight or state.due is None:
                state.in_flight = False
                self._schedule(peer, now)

    async def _attempt(self, peer: Peer, state: _PeerState) -> None:
        try:
            result = await self._client.attest(state.target)
        except AttestError as err:
            self._failed(peer, state, err)
        else:
            self._succeeded(peer, state, result)
        finally:
            state.in_flight = False
            self._in_flight -= 1
            self._wake.set()

    def _succeeded(self, peer: Peer, state: _PeerState, result: Attestation) -> None:
        if self._peers.get(peer) is not state:
            return  # no longer wanted while the handshake ran
        previous = state.result
        state.result = result
        state.refused = False
        state.last_failure = ""
        now = self._now()
        renew = result.not_before + (result.not_after - result.not_before) * self._renew_after
        if previous is not None and previous.serial == result.serial and renew <= now:
            # Past its renewal point and still the same certificate: SPIRE has not rotated it yet.
            self.stats.attempts["rotated-not-yet"] += 1
            renew = min(now + timedelta(seconds=state.backoff.next_delay()), result.not_after)
        else:
            self.stats.attempts["ok"] += 1
            state.backoff.reset()
        self._schedule(peer, max(renew, now))
        if previous is None or previous.serial != result.serial:
            log.info(
                "peer attested",
                peer=str(peer.remote_id),
                node=peer.node,
                address=result.address,
                not_after=result.not_after.isoformat(),
            )
            self._on_change([peer])

    def _failed(self, peer: Peer, state: _PeerState, err: AttestError) -> None:
        self.stats.attempts[err.reason] += 1
        if self._peers.get(peer) is not state:
            return
        delay = state.backoff.next_delay()
        state.last_failure = err.reason
        newly_refused = err.reason not in TRANSIENT and not state.refused
        state.refused = err.reason not in TRANSIENT
        if state.refused:
            state.result = None
        log.warning(
            "attestation failed",
            peer=str(peer.remote_id),
            node=peer.node,
            reason=err.reason,
            error=str(err),
            retry_in_s=round(delay, 3),
            result_kept=state.result is not None,
        )
        self._schedule(peer, self._now() + timedelta(seconds=delay))
        if newly_refused:
            self._on_change([peer])

    def _schedule(self, peer: Peer, due: datetime) -> None:
        state = self._peers[peer]
        state.due = due
        heapq.heappush(self._queue, (due, peer))
        self._wake.set()
