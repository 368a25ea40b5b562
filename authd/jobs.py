"""Named long-running jobs and the supervision that restarts or escalates their failures.

A job is an async callable that runs until cancelled. When it raises, the supervisor decides once, by the
job's declared criticality: a non-critical job is restarted after the shared backoff (reset once it has run
cleanly for a while); a critical job's failure becomes a :class:`~authd.errors.DaemonError` that stops
the daemon with a non-zero status.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import structlog

from authd.backoff import BackoffFactory
from authd.errors import AuthdError, DaemonError
from authd.health import Health

log = structlog.get_logger(__name__)

Sleep = Callable[[float], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Job:
    """A named task of the daemon and what its failure means."""

    name: str
    run: Callable[[], Awaitable[None]]
    critical: bool


class Supervisor:
    """Runs jobs, restarting non-critical ones with backoff and escalating critical failures."""

    def __init__(
        self,
        health: Health,
        backoff: BackoffFactory,
        *,
        stable_after: float = 60.0,
        sleep: Sleep = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``stable_after``: seconds of clean running after which a job's backoff starts over."""
        self._health = health
        self._backoff = backoff
        self._stable_after = stable_after
        self._sleep = sleep
        self._clock = clock
        self.restarts: dict[str, int] = {}

    async def run(self, job: Job) -> None:
        """Run ``job`` until it returns or is cancelled; never returns on a non-critical failure."""
        component = self._health.register(f"job:{job.name}", gates_ready=False)
        backoff = self._backoff()
        structlog.contextvars.bind_contextvars(job=job.name)
        while True:
            component.ready("running")
            started = self._clock()
            try:
                await job.run()
            except Exception as err:  # the supervisor is where a job's failure is decided
                if job.critical:
                    component.failed(f"{type(err).__name__}: {err}")
                    log.error("critical job failed, stopping", exc_info=err)
                    raise DaemonError(f"daemon: critical job {job.name!r} failed: {err}") from err
                if self._clock() - started >= self._stable_after:
                    backoff.reset()
                delay = backoff.next_delay()
                self.restarts[job.name] = self.restarts.get(job.name, 0) + 1
                component.degraded(f"restarting in {delay:.1f}s after {type(err).__name__}: {err}")
                # authd's own errors say what failed in one line; anything else is a bug: its traceback.
                if isinstance(err, AuthdError):
                    log.warning("job failed, restarting", retry_in_s=round(delay, 3), error=str(err))
                else:
                    log.warning("job failed, restarting", retry_in_s=round(delay, 3), exc_info=err)
                await self._sleep(delay)
            else:
                log.info("job finished")
                return
