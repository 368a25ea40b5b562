"""A scripted attestation client: answers per peer from a queue of results, counting handshakes."""

from __future__ import annotations

import asyncio
from collections import Counter, deque
from datetime import UTC, datetime

from authd.attest.client import Attestation, Target
from authd.x509svid import X509Svid


class ScriptedAttestClient:
    """``script(node, svid_or_error)`` queues the next answers for a node; the last one repeats.

    An answer that is an exception is raised: AttestError as a real client would, anything else to
    stand for a bug in the client.
    """

    def __init__(self) -> None:
        self.answers: dict[tuple[str, str], deque[X509Svid | Exception]] = {}
        self.calls: Counter[tuple[str, str]] = Counter()
        self.targets: list[Target] = []
        self.gate: asyncio.Event | None = None  # when set to an unset Event, attempts wait for it

    def script(self, target_id: str, node: str, *answers: X509Svid | Exception) -> None:
        self.answers.setdefault((target_id, node), deque()).extend(answers)

    async def attest(self, target: Target) -> Attestation:
        key = (str(target.remote_id), target.node)
        self.calls[key] += 1
        self.targets.append(target)
        if self.gate is not None:
            await self.gate.wait()
        queue = self.answers[key]
        answer = queue.popleft() if len(queue) > 1 else queue[0]
        if isinstance(answer, Exception):
            raise answer
        return Attestation(
            target.remote_id, target.node, target.addresses[0], answer.chain, datetime.now(UTC)
        )
