"""The one backoff used by every retry loop in authd.

Exponential growth with full jitter around the nominal delay, capped, and reset by the caller on every
success (a received message, a completed handshake). Loops take a factory so tests can inject a backoff
that never sleeps.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Protocol


class Backoff(Protocol):
    """What a retry loop needs: the next delay, and a reset after success."""

    def next_delay(self) -> float:
        """Return the seconds to wait before the next attempt."""
        ...

    def reset(self) -> None:
        """Start over from the initial delay (called after a success)."""
        ...


class BackoffFactory(Protocol):
    """Makes a fresh backoff for one retry loop."""

    def __call__(self) -> Backoff:
        """Return a new backoff at its initial delay."""
        ...


@dataclass(frozen=True, slots=True)
class BackoffPolicy:
    """Parameters of exponential backoff: initial and maximum delay, growth factor and jitter fraction."""

    initial: float = 0.1
    maximum: float = 30.0
    multiplier: float = 2.0
    jitter: float = 0.2

    def __post_init__(self) -> None:
        """Refuse parameters that would make a loop spin or never grow."""
        if not 0 < self.initial <= self.maximum:
            raise ValueError("backoff: need 0 < initial <= maximum")
        if self.multiplier < 1:
            raise ValueError("backoff: multiplier must be >= 1")
        if not 0 <= self.jitter < 1:
            raise ValueError("backoff: jitter must be in [0, 1)")

    def __call__(self) -> Backoff:
        """Make a fresh exponential backoff with these parameters."""
        return ExponentialBackoff(self)


class ExponentialBackoff:
    """Delays initial, initial*m, initial*m^2, ... up to maximum, each spread by +-jitter."""

    def __init__(self, policy: BackoffPolicy, rng: random.Random | None = None) -> None:
        """Start at the policy's initial delay; ``rng`` makes the jitter reproducible in tests."""
        self._policy = policy
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not cryptography
        self._nominal = policy.initial

    def next_delay(self) -> float:
        """Return the current delay with jitter applied, then grow the nominal delay."""
        policy = self._policy
        spread = 1 + policy.jitter * (2 * self._rng.random() - 1)
        delay = min(self._nominal * spread, policy.maximum)
        self._nominal = min(self._nominal * policy.multiplier, policy.maximum)
        return delay

    def reset(self) -> None:
        """Go back to the initial delay."""
        self._nominal = self._policy.initial
