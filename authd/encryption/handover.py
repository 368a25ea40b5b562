"""A node key rotation with no loss: this node's generations on its interfaces, one step at a time.

Each :meth:`Handover.step` reads which links have completed a handshake, plans
(:func:`authd.encryption.links.plan`) and applies the plan (:class:`~authd.encryption.interfaces.Interfaces`);
while a rotation runs, it then asks :func:`~authd.encryption.links.retirement` whether the older
generation can go, and if so removes it at once. What a step returns is what a node tells each remote
node: the generation of it this node now sends to (``plan.sending``), beside the generations it
announces (:meth:`~authd.encryption.links.Generations.announced`). The node channel does not carry
these yet, and the encryption job does not run a handover: tests/privileged/test_encryption_rotation.py
runs two, and passes each what the other says.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import structlog

from authd.encryption.interfaces import Interfaces
from authd.encryption.keys import KeyPair
from authd.encryption.links import Generations, Plan, Remote, Retirement, plan, retirement

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class Step:
    """What one step applied, and the retirement it made (None: none)."""

    plan: Plan
    retired: Retirement | None


class Handover:
    """This node's key generations and interfaces, kept in line with what the remote nodes announce."""

    def __init__(self, interfaces: Interfaces, generations: Generations, clock: Callable[[], float]) -> None:
        """Nothing is applied before the first :meth:`step`."""
        self.interfaces, self.generations, self._clock = interfaces, generations, clock

    def rotate(self, pair: KeyPair | None = None) -> int:
        """Begin a rotation to a new generation (key ``pair``, else a fresh one); its number.

        The next step opens its interfaces and peers; the rotation ends in the step that retires the
        older generation.
        """
        number = self.generations.begin(pair or KeyPair.generate(), self._clock())
        log.info("wireguard rotation begun", generation=number)
        return number

    def step(self, remotes: Sequence[Remote]) -> Step:
        """Plan from the devices' handshakes and apply; retire the older generation once it may go."""
        interfaces, generations = self.interfaces, self.generations
        handshaken = interfaces.handshaken(interfaces.status())
        applied = plan(generations.pairs, remotes, handshaken)
        interfaces.apply(applied, generations.pairs)
        since = generations.rotating_since
        if since is None:
            return Step(applied, None)
        verdict = retirement(generations.pairs, remotes, applied.sending, self._clock() - since)
        if verdict == "wait":
            return Step(applied, None)
        older = generations.retire()
        applied = plan(generations.pairs, remotes, handshaken)
        interfaces.apply(applied, generations.pairs)
        log.info("wireguard generation retired", generation=older, result=verdict)
        return Step(applied, verdict)
