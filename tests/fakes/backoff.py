"""A backoff that never waits and counts how often it was asked to."""

from __future__ import annotations


class CountingBackoff:
    """Zero delays; ``delays`` counts next_delay() calls, ``resets`` counts reset() calls."""

    def __init__(self) -> None:
        self.delays = 0
        self.resets = 0

    def next_delay(self) -> float:
        self.delays += 1
        return 0.0

    def reset(self) -> None:
        self.resets += 1

    def __call__(self) -> CountingBackoff:
        """Act as its own factory, so a test can inspect the one instance a loop used."""
        return self
