"""Scripted channels: answer each wanted peer from a queue of results, as a peer node would push them."""

from __future__ import annotations

import asyncio
from collections import Counter, deque
from collections.abc import Collection, Mapping
from datetime import UTC, datetime

from authd.attest.outcomes import NOT_HOSTED, not_hosted, transient
from authd.attest.results import Attestation, Attestations, Peer, Target
from authd.errors import AttestError
from authd.x509svid import X509Svid


class ScriptedChannels:
    """The channels as the results see them (an ``Asker``).

    ``script(identity, node, *answers)`` queues the next answers for a peer; the last one repeats. A peer
    is answered when it is first wanted, when asked again or hurried, and at once when a script is added
    while it is wanted (the peer node pushes its news). An AttestError answer is reported as a failure:
    "not-hosted" as the peer's answer, any other reason as transient.
    """

    def __init__(self, results: Attestations) -> None:
        self.results = results
        self.answers: dict[tuple[str, str], deque[X509Svid | AttestError]] = {}
        self.calls: Counter[tuple[str, str]] = Counter()
        self.targets: list[Target] = []
        self._wanted: dict[Peer, Target] = {}
        results.ask_through(self)

    def script(self, identity: str, node: str, *answers: X509Svid | AttestError) -> None:
        self.answers.setdefault((identity, node), deque()).extend(answers)
        for peer in self._wanted:
            if (str(peer.remote_id), peer.node) == (identity, node):
                self._answer_soon(peer)

    def want(self, targets: Mapping[Peer, Target]) -> None:
        new = [peer for peer in targets if peer not in self._wanted]
        self._wanted = dict(targets)
        for peer in new:
            self.targets.append(targets[peer])
            self._answer_soon(peer)

    def ask_again(self, peers: Collection[Peer]) -> None:
        for peer in peers:
            self._answer_soon(peer)

    def hurry(self, node: str) -> bool:
        waiting = [p for p in self._wanted if p.node == node and self.results.result(p) is None]
        for peer in waiting:
            self._answer_soon(peer)
        return bool(waiting)

    def _answer_soon(self, peer: Peer) -> None:
        asyncio.get_running_loop().call_soon(self._answer, peer)

    def _answer(self, peer: Peer) -> None:
        key = (str(peer.remote_id), peer.node)
        queue = self.answers.get(key)
        if peer not in self._wanted or not queue:
            return
        self.calls[key] += 1
        answer = queue.popleft() if len(queue) > 1 else queue[0]
        if isinstance(answer, AttestError):
            outcome = not_hosted(synced=True) if answer.reason == NOT_HOSTED else transient(answer.reason)
            self.results.failed(peer, outcome, str(answer))
            return
        target = self._wanted[peer]
        self.results.proved(
            Attestation(peer.remote_id, peer.node, target.addresses[0], answer.chain, datetime.now(UTC))
        )
