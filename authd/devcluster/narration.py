"""How the demo talks: headings, wrapped prose, verbatim command output, and checked claims.

Every claim the demo makes is a :meth:`Narrator.check`: it is printed with its verdict, and a failed
one makes the demo exit non-zero, so the story cannot drift from what the system does.
"""

from __future__ import annotations

import sys
import textwrap
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TextIO

WIDTH = 100


@dataclass
class Narrator:
    """Prints the demo's story and remembers which of its claims failed."""

    out: TextIO = sys.stdout
    failures: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

    def _print(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)

    def title(self, text: str) -> None:
        """The demo's title."""
        self._print(text)
        self._print("=" * len(text))

    def heading(self, text: str) -> None:
        """A new part of the story."""
        self._print()
        self._print(text)
        self._print("-" * len(text))

    def say(self, text: str) -> None:
        """A paragraph, wrapped."""
        self._print(textwrap.fill(" ".join(text.split()), WIDTH))

    def command(self, where: str, argv: str, lines: Iterable[str]) -> None:
        """A command as typed on ``where`` and its output, verbatim (never wrapped)."""
        self._print(f"  [{where}]$ {argv}")
        for line in lines:
            self._print(f"    {line}")

    def show(self, lines: Iterable[str]) -> None:
        """Lines of data, indented, verbatim."""
        for line in lines:
            self._print(f"    {line}")

    def check(self, ok: bool, claim: str) -> bool:  # noqa: FBT001 - reads as check(condition, claim)
        """Print a claim with its verdict; remember it if it failed."""
        self._print(f"  [{'ok' if ok else 'FAILED'}] {claim}")
        if not ok:
            self.failures.append(claim)
        return ok

    def elapsed(self) -> float:
        """Seconds since the demo started."""
        return time.monotonic() - self.started

    def verdict(self) -> int:
        """Print the outcome; the exit status (0 when every claim held)."""
        self._print()
        if self.failures:
            self._print(
                f"demo FAILED after {self.elapsed():.1f} s: {len(self.failures)} claims did not hold:"
            )
            for claim in self.failures:
                self._print(f"  - {claim}")
            return 1
        self._print(f"demo finished in {self.elapsed():.1f} s: every claim held.")
        return 0
