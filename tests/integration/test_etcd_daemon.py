"""``authd run`` with ``cluster.source = "etcd"``: ready on etcd's state, degraded while etcd is down and
back without a restart, a wiped prefix held until ``authd cluster accept``."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp

from tests.etcd import EtcdCluster
from tests.integration.devspire import (
    AUTHD_ID,
    ME,
    DevSpireProcess,
    free_port,
    node_a_config,
    short_dir,
    write_entries,
)
from tests.integration.test_operations import get, wait_for_status


def authd_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "authd", *args], capture_output=True, text=True, timeout=60, check=False
    )


def etcd_config(directory: Path, cluster: EtcdCluster, http_port: int) -> Path:
    config = node_a_config(
        directory,
        f'[http]\nlisten_address = "127.0.0.1"\nport = {http_port}\n'
        f'[cluster.etcd]\nendpoints = ["{cluster.endpoints[0]}"]\nprefix = "/authd/"\n'
        'retry_initial = "50ms"\nretry_max = "200ms"\n',
    )
    config.write_text(config.read_text().replace("[cluster]\n", '[cluster]\nsource = "etcd"\n'))
    return config


async def wait_for_cluster(session: aiohttp.ClientSession, url: str, state: str) -> dict[str, object]:
    """The cluster component of /readyz once it is in ``state``."""
    async with asyncio.timeout(15):
        while True:
            _, body = await get(session, url)
            component: dict[str, object] = next(
                c
                for c in body["components"]  # type: ignore[attr-defined]
                if c["name"] == "cluster"
            )
            if component["state"] == state:
                return component
            await asyncio.sleep(0.05)


def restart(etcd: EtcdCluster) -> None:
    for member in etcd.members:
        etcd.start_member(member)
    etcd.wait_healthy()


async def metric_lines(session: aiohttp.ClientSession, port: int, name: str) -> list[str]:
    async with session.get(f"http://127.0.0.1:{port}/metrics") as response:
        metrics = await response.text()
    return [line for line in metrics.splitlines() if line.startswith((f"{name} ", f"{name}{{"))]


async def state_age(session: aiohttp.ClientSession, port: int) -> float:
    (line,) = await metric_lines(session, port, "authd_cluster_state_age_seconds")
    return float(line.split()[-1])


async def wait_for_age(session: aiohttp.ClientSession, port: int, at_least: float) -> None:
    async with asyncio.timeout(10):
        while await state_age(session, port) < at_least:  # noqa: ASYNC110 - polled over HTTP
            await asyncio.sleep(0.1)


async def test_daemon_on_etcd_fails_static_and_accepts_a_held_state() -> None:
    with short_dir() as directory:
        etcd = EtcdCluster(directory / "etcd")
        seed = write_entries(
            directory / "entries.toml",
            [{"spiffe_id": str(AUTHD_ID), "node": "node-a", "selectors": [str(ME)]}],
        )
        port = free_port()
        config = etcd_config(directory, etcd, port)
        cluster_file = directory / "cluster.toml"
        env = {key: value for key, value in os.environ.items() if key != "SPIFFE_ENDPOINT_SOCKET"}
        spire = DevSpireProcess(
            ["--dir", str(directory), "--trust-domain", "example.org", "--node", "node-a",
             "--entries", str(seed), "--authorized-delegate", str(AUTHD_ID)]
        )  # fmt: skip
        authd = None
        readyz = f"http://127.0.0.1:{port}/readyz"
        try:
            etcd.start()
            pushed = await asyncio.to_thread(
                authd_cli, "cluster", "push", "--config", str(config), str(cluster_file)
            )
            assert pushed.returncode == 0, pushed.stderr
            await spire.start()
            authd = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "authd", "run", "--config", str(config),
                env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
            )  # fmt: skip
            async with aiohttp.ClientSession() as session:
                await wait_for_status(session, readyz, 200, within=30)

                await asyncio.to_thread(etcd.close)
                # Readiness is latched once reached; the cluster component in /readyz's body says degraded.
                component = await wait_for_cluster(session, readyz, "degraded")
                assert "keeping version" in str(component["reason"])
                await wait_for_age(session, port, 1.0)  # the age of the state in force grows while down
                shown = await asyncio.to_thread(authd_cli, "status", "--json", "--config", str(config))
                assert json.loads(shown.stdout)["cluster"]["out_of_touch_s"] is not None

                await asyncio.to_thread(restart, etcd)
                await wait_for_cluster(session, readyz, "ready")
                assert await state_age(session, port) == 0

                wiped = directory / "empty.toml"
                wiped.write_text("")
                forced = await asyncio.to_thread(
                    authd_cli, "cluster", "push", "--config", str(config), str(wiped)
                )
                assert forced.returncode == 0, forced.stderr
                held = await wait_for_cluster(session, readyz, "degraded")
                assert "held back" in str(held["reason"])
                (exposed,) = await metric_lines(session, port, "authd_cluster_state_held")
                assert 'reason="it no longer lists this node \\"node-a\\""' in exposed, exposed
                assert exposed.endswith(" 1.0"), exposed
                accepted = await asyncio.to_thread(authd_cli, "cluster", "accept", "--config", str(config))
                assert accepted.returncode == 0, accepted.stderr
                assert "0 nodes, 0 endpoints" in accepted.stdout

            authd.send_signal(signal.SIGTERM)
            async with asyncio.timeout(10):
                assert await authd.wait() == 0
        finally:
            if authd is not None and authd.returncode is None:
                authd.kill()
                await authd.wait()
            await spire.kill()
            etcd.close()
