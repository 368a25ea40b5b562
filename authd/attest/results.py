"""The results of attestation: "R at node A until T", one per wanted :class:`Peer`, fed by the channels.

The auth manager says which peers it wants (:meth:`Attestations.want`); the channels ask the peers'
nodes for them and report proofs (:meth:`Attestations.proved`) and failures
(:meth:`Attestations.failed`), classified by :mod:`authd.attest.outcomes`: an answer drops the result at
once, a transient failure keeps it until it expires. A bundle change re-verifies every remembered chain
(:meth:`Attestations.bundles_changed`) and revokes what no longer verifies, at once. Every local identity
that policy pairs with a peer shares its one result, so proofs grow with identities, never with pairs.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol

import structlog
from cryptography import x509

from authd.attest.outcomes import Outcome
from authd.errors import SvidError
from authd.identity import SpiffeId
from authd.x509svid import BundleSet, authorize_id, fresh_copy, verify_chain

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True, order=True)
class Peer:
    """One remote identity at one remote node."""

    remote_id: SpiffeId
    node: str


@dataclass(frozen=True, slots=True)
class Target:
    """Where to ask for ``remote_id``: node ``node``, whose authd runs as ``node_id``, at ``addresses``."""

    remote_id: SpiffeId
    node: str
    node_id: SpiffeId
    addresses: tuple[str, ...]
    port: int


@dataclass(frozen=True, slots=True)
class Attestation:
    """Identity ``remote_id`` proved itself at ``node`` (over the channel through ``address``)."""

    remote_id: SpiffeId
    node: str
    address: str
    chain: tuple[x509.Certificate, ...]
    verified_at: datetime
    not_after: datetime = field(init=False, repr=False, compare=False)
    """When the remote leaf expires: one object, shared by every auth entry that expires with it."""

    def __post_init__(self) -> None:
        """Read the leaf's expiry once."""
        object.__setattr__(self, "not_after", self.chain[0].not_valid_after_utc)

    @property
    def serial(self) -> int:
        """The remote leaf's serial number: a new one means the remote SVID rotated."""
        return self.chain[0].serial_number

    def reverify(self, bundles: BundleSet, at: datetime) -> None:
        """Check the remembered chain against new bundles (after a bundle change); raise SvidError."""
        verify_chain(fresh_copy(self.chain), bundles, at=at, authorize=authorize_id(self.remote_id))


@dataclass(frozen=True, slots=True)
class PeerStatus:
    """What ``authd status`` shows of one wanted peer: its valid result, if any, and its last failure.

    ``in_flight``: asked, and neither answered nor proved yet.
    """

    peer: Peer
    result: Attestation | None
    refused: bool
    last_failure: str
    in_flight: bool


@dataclass
class ResultStats:
    """Outcomes reported by the channels: "ok", "rotated" or a failure reason."""

    attempts: Counter[str] = field(default_factory=Counter)


class Asker(Protocol):
    """What the results need from the channels."""

    def want(self, targets: Mapping[Peer, Target]) -> None:
        """Ask each target's node for its identity (the full set; what is missing is no longer wanted)."""
        ...

    def ask_again(self, peers: Collection[Peer]) -> None:
        """Ask for these peers again (their result went away)."""
        ...

    def hurry(self, node: str) -> bool:
        """Traffic waits for ``node``: connect now if no channel is up; True if that was done."""
        ...


@dataclass
class _State:
    result: Attestation | None = None
    refused: bool = False
    last_failure: str = ""


class Attestations:
    """The valid attestation of every wanted peer, as the channels report them."""

    def __init__(
        self,
        *,
        on_change: Callable[[Collection[Peer]], None],
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        """``on_change`` is called with the peers whose result appeared, changed or went away."""
        self._on_change = on_change
        self._now = now
        self._asker: Asker | None = None
        self._peers: dict[Peer, _State] = {}
        self._targets: dict[Peer, Target] = {}
        self.stats = ResultStats()

    def ask_through(self, asker: Asker) -> None:
        """Let ``asker`` (the channels) ask for the wanted peers."""
        self._asker = asker
        asker.want(self._targets)

    # ------------------------------------------------------------------ what the auth manager calls

    def want(self, targets: Mapping[Peer, Target]) -> None:
        """Set the peers to keep attested; dropped ones are forgotten."""
        dropped = [peer for peer in self._peers if peer not in targets and self._peers[peer].result]
        self._peers = {peer: self._peers.get(peer) or _State() for peer in targets}
        self._targets = dict(targets)
        if self._asker is not None:
            self._asker.want(self._targets)
        if dropped:
            self._on_change(dropped)

    def request(self, peer: Peer) -> bool:
        """Traffic waits for ``peer``: True if that made a channel connect sooner."""
        if peer not in self._peers or self.result(peer) is not None or self._asker is None:
            return False
        return self._asker.hurry(peer.node)

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

    def refused(self, peer: Peer) -> bool:
        """Whether the last outcome for ``peer`` was an answer that refused it (not hosted, not it)."""
        state = self._peers.get(peer)
        return state is not None and state.refused

    def peers(self) -> list[PeerStatus]:
        """Every wanted peer, sorted, with its valid result and its last failure."""
        return [
            PeerStatus(
                peer,
                self.result(peer),
                state.refused,
                state.last_failure,
                in_flight=state.result is None and not state.last_failure,
            )
            for peer, state in sorted(self._peers.items())
        ]

    # --------------------------------------------------------------------- what the channels report

    def proved(self, attestation: Attestation) -> None:
        """A verified proof of a peer arrived."""
        peer = Peer(attestation.remote_id, attestation.node)
        state = self._peers.get(peer)
        if state is None:
            self.stats.attempts["unwanted"] += 1
            return
        previous = state.result
        state.result, state.refused, state.last_failure = attestation, False, ""
        if previous is not None and previous.serial == attestation.serial:
            self.stats.attempts["repeated"] += 1
            return
        self.stats.attempts["ok" if previous is None else "rotated"] += 1
        log.info(
            "peer attested",
            peer=str(peer.remote_id),
            node=peer.node,
            address=attestation.address,
            not_after=attestation.not_after.isoformat(),
        )
        self._on_change([peer])

    def failed(self, peer: Peer, outcome: Outcome, detail: str) -> None:
        """A peer's node answered that it does not host it, or its proof broke a rule, or asking failed."""
        self.stats.attempts[outcome.reason] += 1
        state = self._peers.get(peer)
        if state is None:
            return
        state.last_failure = outcome.reason
        dropped = outcome.answer and state.result is not None
        newly_refused = outcome.answer and not state.refused
        if outcome.answer:
            state.result, state.refused = None, True
        log.warning(
            "attestation failed",
            peer=str(peer.remote_id),
            node=peer.node,
            reason=outcome.reason,
            error=detail,
            result_kept=state.result is not None,
        )
        if dropped or newly_refused:
            self._on_change([peer])

    def bundles_changed(self, bundles: BundleSet) -> None:
        """Re-verify every remembered chain against new bundles; revoke those that fail, and ask again."""
        now = self._now()
        dropped = []
        for peer, state in self._peers.items():
            if state.result is None:
                if state.refused:
                    dropped.append(peer)  # refused under the old bundles: may verify under the new ones
                continue
            try:
                state.result.reverify(bundles, now)
            except SvidError as err:
                log.warning(
                    "attestation no longer verifies", peer=str(peer.remote_id), node=peer.node, rule=err.rule
                )
                # An answer, like a chain rule broken by a proof: revoked, and its entries go at once.
                state.result, state.refused, state.last_failure = None, True, err.rule
                dropped.append(peer)
        if dropped:
            self._on_change(dropped)
            if self._asker is not None:
                self._asker.ask_again(dropped)
