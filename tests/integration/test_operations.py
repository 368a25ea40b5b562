"""``authd run`` as an operator meets it: /readyz before and after SPIRE serves it, ``authd status``."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import aiohttp

from tests.integration.devspire import (
    AUTHD_ID,
    ME,
    DevSpireProcess,
    free_port,
    node_a_config,
    short_dir,
    write_entries,
)


def authd_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "authd", *args], capture_output=True, text=True, timeout=60, check=False
    )


def write_config(directory: Path, http_port: int) -> Path:
    return node_a_config(directory, f'[http]\nlisten_address = "127.0.0.1"\nport = {http_port}\n')


async def get(session: aiohttp.ClientSession, url: str) -> tuple[int, dict[str, object]]:
    async with session.get(url) as response:
        return response.status, await response.json()


async def wait_for_status(session: aiohttp.ClientSession, url: str, status: int, within: float) -> None:
    async with asyncio.timeout(within):
        while True:
            try:
                if (await get(session, url))[0] == status:
                    return
            except aiohttp.ClientConnectionError:
                pass  # not listening yet
            await asyncio.sleep(0.05)


async def test_readyz_waits_for_svids_and_status_shows_them() -> None:
    with short_dir() as directory:
        seed = write_entries(
            directory / "entries.toml",
            [{"spiffe_id": str(AUTHD_ID), "node": "node-a", "selectors": [str(ME)]}],
        )
        port = free_port()
        config = write_config(directory, port)
        env = {key: value for key, value in os.environ.items() if key != "SPIFFE_ENDPOINT_SOCKET"}
        authd = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "authd", "run", "--config", str(config),
            env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        spire = DevSpireProcess(
            ["--dir", str(directory), "--trust-domain", "example.org", "--node", "node-a",
             "--entries", str(seed), "--authorized-delegate", str(AUTHD_ID)]
        )  # fmt: skip
        readyz = f"http://127.0.0.1:{port}/readyz"
        try:
            async with aiohttp.ClientSession() as session:
                # Serving, but no SPIRE agent yet: not ready, and the svids component says why.
                await wait_for_status(session, readyz, 503, within=30)
                code, body = await get(session, readyz)
                components = {c["name"]: c for c in body["components"]}  # type: ignore[attr-defined]
                assert code == 503
                assert components["svids"]["state"] in {"starting", "degraded"}
                stopped = await asyncio.to_thread(authd_cli, "status", "--json", "--config", str(config))
                assert stopped.returncode == 0, stopped.stderr
                assert json.loads(stopped.stdout)["svids"]["own"] is None

                await spire.start()
                await wait_for_status(session, readyz, 200, within=30)
                async with session.get(f"http://127.0.0.1:{port}/metrics") as response:
                    assert 'authd_svids{kind="own"} 1.0' in await response.text()

            shown = await asyncio.to_thread(authd_cli, "status", "--json", "--config", str(config))
            assert shown.returncode == 0, shown.stderr
            report = json.loads(shown.stdout)
            assert report["ready"]
            assert report["svids"]["own"]["spiffe_id"] == str(AUTHD_ID)
            assert report["svids"]["own"]["expires_in_s"] > 60
            assert report["peers"] == []
            assert report["datapath"] == {"enabled": False}
            # The agent was missing at first: the logbook kept the warning.
            assert any(e["event"] == "spire stream lost, reconnecting" for e in report["recent"])
            text = await asyncio.to_thread(authd_cli, "status", "--config", str(config))
            assert f"own SVID:  {AUTHD_ID} expires" in text.stdout

            authd.send_signal(signal.SIGTERM)
            async with asyncio.timeout(10):
                assert await authd.wait() == 0
        finally:
            if authd.returncode is None:
                authd.kill()
                await authd.wait()
            await spire.kill()


def test_status_says_how_to_start_a_daemon_that_is_not_running(tmp_path: Path) -> None:
    config = tmp_path / "authd.toml"
    config.write_text(f'[node]\nstate_dir = "{tmp_path}/state"\nruntime_dir = "{tmp_path}/run"\n')
    missing = authd_cli("status", "--config", str(config))
    assert missing.returncode == 3
    assert f"authd is not running: control: no socket at {tmp_path}/run/authd.sock" in missing.stderr
    assert "systemctl start authd" in missing.stderr
    assert "journalctl -u authd" in missing.stderr

    (tmp_path / "run").mkdir()
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(tmp_path / "run" / "authd.sock"))  # a socket left by a crash: nobody listens
    stale.close()
    refused = authd_cli("status", "--config", str(config))
    assert refused.returncode == 3
    assert "nothing listens at" in refused.stderr
