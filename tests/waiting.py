"""Waiting in tests for what other tasks or processes do, with a deadline instead of a fixed sleep."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


async def eventually(condition: Callable[[], bool], within: float = 3.0) -> None:
    """Return as soon as ``condition()`` holds; fail the test after ``within`` seconds."""
    async with asyncio.timeout(within):
        # Polling: the state is changed by code under test that offers no event to wait on.
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0.01)
