from __future__ import annotations

import asyncio

import pytest

from authd.errors import DaemonError
from authd.health import Health, State
from authd.jobs import Job, Supervisor
from tests.fakes.backoff import CountingBackoff


class Flaky:
    """Fails ``failures`` times, then returns."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls = 0

    async def __call__(self) -> None:
        self.calls += 1
        if self.calls <= self.failures:
            raise RuntimeError(f"boom {self.calls}")


async def no_sleep(_seconds: float) -> None:
    await asyncio.sleep(0)


async def test_non_critical_job_is_restarted_with_backoff() -> None:
    health, backoff, job = Health(), CountingBackoff(), Flaky(failures=3)
    supervisor = Supervisor(health, backoff, sleep=no_sleep)
    await supervisor.run(Job("flaky", job, critical=False))
    assert job.calls == 4
    assert backoff.delays == 3
    assert supervisor.restarts == {"flaky": 3}


async def test_backoff_resets_after_a_stable_run() -> None:
    now = [0.0]

    def clock() -> float:
        return now[0]

    async def slow_then_fail() -> None:
        now[0] += 100.0
        raise RuntimeError("late failure")

    backoff = CountingBackoff()
    third_sleep = asyncio.Event()

    async def sleep(_seconds: float) -> None:
        if backoff.delays >= 3:
            third_sleep.set()
        await asyncio.sleep(0)

    supervisor = Supervisor(Health(), backoff, stable_after=60, sleep=sleep, clock=clock)
    task = asyncio.create_task(supervisor.run(Job("late", slow_then_fail, critical=False)))
    await third_sleep.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert backoff.resets >= 3


async def test_critical_failure_becomes_daemon_error_and_fails_health() -> None:
    health = Health()
    supervisor = Supervisor(health, CountingBackoff(), sleep=no_sleep)
    with pytest.raises(DaemonError, match="critical job 'core' failed: boom 1"):
        await supervisor.run(Job("core", Flaky(failures=1), critical=True))
    assert not health.healthy
    assert [s.state for s in health.snapshot()] == [State.FAILED]


async def test_cancellation_is_not_treated_as_failure() -> None:
    started = asyncio.Event()

    async def forever() -> None:
        started.set()
        await asyncio.Event().wait()

    backoff = CountingBackoff()
    supervisor = Supervisor(Health(), backoff, sleep=no_sleep)
    task = asyncio.create_task(supervisor.run(Job("forever", forever, critical=True)))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert backoff.delays == 0
