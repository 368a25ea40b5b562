"""``authd run`` with SPIRE: READY=1 waits for authd's own SVID and the bundles, even if the agent is late."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
from pathlib import Path

from tests.integration.devspire import (
    AUTHD_ID,
    DECOY,
    ME,
    DevSpireProcess,
    node_a_config,
    register_after_a_decoy,
    short_dir,
    write_entries,
)


class AsyncNotifyReceiver:
    """systemd's NOTIFY_SOCKET, read without blocking the event loop."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)  # noqa: FBT003 - socket API
        self.messages: list[str] = []

    def drain(self) -> list[str]:
        while True:
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except BlockingIOError:
                return self.messages

    async def wait_for(self, line: str, within: float) -> None:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(within):
            while not any(line in message.splitlines() for message in self.drain()):
                self.messages.append((await loop.sock_recv(self.sock, 4096)).decode())


async def wait_for_log(proc: asyncio.subprocess.Process, event: str, within: float) -> dict[str, object]:
    assert proc.stdout is not None
    async with asyncio.timeout(within):
        while True:
            line = (await proc.stdout.readline()).decode()
            assert line, f"authd exited before logging {event!r}"
            if line.startswith("{") and json.loads(line).get("event") == event:
                return dict(json.loads(line))


async def test_authd_becomes_ready_once_spire_serves_its_identity() -> None:
    with short_dir() as directory:
        seed = write_entries(
            directory / "entries.toml",
            [{"spiffe_id": str(AUTHD_ID), "node": "node-a", "selectors": [str(ME)]}],
        )
        config = node_a_config(directory)
        notify = AsyncNotifyReceiver(directory / "notify.sock")
        env = {key: value for key, value in os.environ.items() if key != "SPIFFE_ENDPOINT_SOCKET"}
        authd = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "authd", "run", "--config", str(config),
            env={**env, "NOTIFY_SOCKET": str(notify.path)},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        spire = DevSpireProcess(
            ["--dir", str(directory), "--trust-domain", "example.org", "--node", "node-a",
             "--entries", str(seed), "--authorized-delegate", str(AUTHD_ID)]
        )  # fmt: skip
        try:
            # The agent is not there yet: authd runs, retries, and does not claim to be ready.
            lost = await wait_for_log(authd, "spire stream lost, reconnecting", within=30)
            assert "does not exist" in str(lost["error"])
            assert "READY=1" not in "\n".join(notify.drain())

            await spire.start()
            await notify.wait_for("READY=1", within=30)

            authd.send_signal(signal.SIGTERM)
            async with asyncio.timeout(10):
                assert await authd.wait() == 0
        finally:
            if authd.returncode is None:
                authd.kill()
                await authd.wait()
            await spire.kill()
            notify.sock.close()


async def test_authd_refuses_to_start_without_an_svid_for_its_node_id() -> None:
    """The agent issues authd's uid an SVID, but not with the node ID: authd exits, saying which it got."""
    with short_dir() as directory:
        seed = write_entries(
            directory / "entries.toml",
            [{"spiffe_id": "spiffe://example.org/web", "node": "node-a", "selectors": [str(ME)]}],
        )
        config = node_a_config(directory)
        env = {key: value for key, value in os.environ.items() if key != "SPIFFE_ENDPOINT_SOCKET"}
        spire = DevSpireProcess(
            ["--dir", str(directory), "--trust-domain", "example.org", "--node", "node-a",
             "--entries", str(seed), "--authorized-delegate", str(AUTHD_ID)]
        )  # fmt: skip
        await spire.start()
        authd = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "authd", "run", "--config", str(config),
            env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        try:
            async with asyncio.timeout(30):
                output, _ = await authd.communicate()
            assert authd.returncode == 1
            text = output.decode()
            assert "critical job 'spire-workload-api' failed" in text
            assert "no SVID for the node ID spiffe://example.org/authd/node-a" in text
            assert "issued: spiffe://example.org/web" in text
        finally:
            if authd.returncode is None:
                authd.kill()
                await authd.wait()
            await spire.kill()


async def test_a_second_svid_listed_first_never_becomes_the_node_identity() -> None:
    """The agent lists a decoy SVID for authd's uid first, the node ID second: authd runs as the node ID."""
    with short_dir() as directory:
        seed = write_entries(directory / "entries.toml", [])
        config = node_a_config(directory)
        notify = AsyncNotifyReceiver(directory / "notify.sock")
        env = {key: value for key, value in os.environ.items() if key != "SPIFFE_ENDPOINT_SOCKET"}
        spire = DevSpireProcess(
            ["--dir", str(directory), "--trust-domain", "example.org", "--node", "node-a",
             "--entries", str(seed), "--authorized-delegate", str(AUTHD_ID)]
        )  # fmt: skip
        await spire.start()
        authd: asyncio.subprocess.Process | None = None
        try:
            await register_after_a_decoy(directory)
            authd = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "authd", "run", "--config", str(config),
                env={**env, "NOTIFY_SOCKET": str(notify.path)},
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            )  # fmt: skip
            ready = await wait_for_log(authd, "SVID store ready", within=30)
            assert ready["own"] == str(AUTHD_ID)
            assert ready["own"] != str(DECOY)
            await notify.wait_for("READY=1", within=30)
            authd.send_signal(signal.SIGTERM)
            async with asyncio.timeout(10):
                assert await authd.wait() == 0
        finally:
            if authd is not None and authd.returncode is None:
                authd.kill()
                await authd.wait()
            await spire.kill()
            notify.sock.close()
