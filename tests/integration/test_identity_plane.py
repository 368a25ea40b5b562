"""The identity plane as the daemon builds it: config, jobs, store, and the ``svids`` health component."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Callable
from pathlib import Path

import pytest

from authd.config.model import SpireConfig
from authd.errors import ConfigError
from authd.health import Component, Health, State
from authd.identity import Selector, SpiffeId
from authd.spire.agent import IdentityPlane
from authd.spire.dev.registry import agent_id
from authd.spire.dev.service import admin_socket, workload_socket
from authd.spire.entries import EntryClient, RegistrationEntry
from tests.integration.devspire import AUTHD_ID, ME, NODE, TD, entry_socket, options, running, short_dir

W1 = SpiffeId.parse("spiffe://example.org/web")
S1 = Selector("unix", "uid:1001")


class WatchedHealth(Health):
    """The real registry, plus an event set on every change so tests need not poll."""

    def __init__(self) -> None:
        super().__init__()
        self.moved = asyncio.Event()

    def changed(self) -> None:
        super().changed()
        self.moved.set()

    async def until(self, condition: Callable[[], bool], within: float = 10.0) -> None:
        async with asyncio.timeout(within):
            while not condition():
                self.moved.clear()
                await self.moved.wait()


def test_not_built_without_spire() -> None:
    health = Health()
    assert (
        IdentityPlane.from_config(SpireConfig(enabled=False), lambda: health.register("svids"), node=NODE)
        is None
    )
    assert (
        IdentityPlane.from_config(SpireConfig(), lambda: health.register("svids"), node=NODE, environ={})
        is None
    )
    assert health.snapshot() == []  # nothing registered: nothing keeps the daemon from READY


def test_environment_socket_is_used_and_checked() -> None:
    health = Health()
    env = {"SPIFFE_ENDPOINT_SOCKET": "unix:///run/spire/agent/public/api.sock"}
    plane = IdentityPlane.from_config(SpireConfig(), lambda: health.register("svids"), node=NODE, environ=env)
    assert plane is not None
    assert [job.name for job in plane.jobs()] == [
        "spire-workload-api",
        "spire-delegated-identity",
        "svids-health",
    ]
    # The same rule as in the config file, for a socket that only the environment names.
    with pytest.raises(ConfigError, match="admin_socket"):
        IdentityPlane.from_config(
            SpireConfig(admin_socket=Path("/run/spire/agent/public/admin.sock")),
            lambda: Health().register("svids"),
            node=NODE,
            environ=env,
        )


async def test_svids_health_is_ready_then_degraded_while_spire_is_away_then_ready() -> None:
    with short_dir() as directory:
        health = WatchedHealth()
        components: list[Component] = []

        def register() -> Component:
            components.append(health.register("svids"))
            return components[-1]

        config = SpireConfig(
            workload_socket=workload_socket(directory, "node-a"),
            admin_socket=admin_socket(directory, "node-a"),
            reconnect_backoff_initial=dt.timedelta(milliseconds=50),
            reconnect_backoff_max=dt.timedelta(milliseconds=300),
        )
        plane = IdentityPlane.from_config(config, register, node=NODE, environ={})
        assert plane is not None
        plane.set_workloads({W1: [S1]})
        (svids,) = components
        tasks = [asyncio.ensure_future(job.run()) for job in plane.jobs()]
        try:
            async with running(options(directory)):
                async with EntryClient(entry_socket(directory)) as client:
                    parent = agent_id(TD, "node-a")
                    await client.create_entries(
                        [RegistrationEntry(AUTHD_ID, parent, (ME,)), RegistrationEntry(W1, parent, (S1,))]
                    )
                await asyncio.wait_for(health.wait_ready(), 10)
                await health.until(
                    lambda: plane.store.svid_for(W1) is not None and svids.status.state is State.READY
                )
            # dev-spire stopped: streams fail, the last good SVIDs stay, health says degraded and why.
            await health.until(lambda: svids.status.state is State.DEGRADED)
            assert "workload-api" in svids.status.reason
            assert plane.store.own_svid() is not None
            assert plane.store.svid_for(W1) is not None
            async with running(options(directory)):
                await health.until(lambda: svids.status.state is State.READY)
            assert not any(task.done() for task in tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
