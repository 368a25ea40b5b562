"""Running ``authd dev-spire`` in tests: in-process (fast) or as a real process (to kill and restart it)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import os
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc

from authd.identity import Selector, SpiffeId, TrustDomain
from authd.spire._proto import workload_pb2
from authd.spire.dev.service import DevSpire, DevSpireOptions, admin_socket, server_socket, workload_socket
from authd.spire.endpoint import Endpoint
from authd.spire.entries import EntryClient, RegistrationEntry
from authd.spire.workload import FETCH_X509_SVID, SECURITY_HEADER, NodeIdentity
from authd.svids import EventKind, Subscription, SvidEvent

TD = TrustDomain("example.org")
UID = os.getuid()
ME = Selector("unix", f"uid:{UID}")
AUTHD_ID = SpiffeId.parse("spiffe://example.org/authd/node-a")
NODE = NodeIdentity("node-a")  # whose node SVID is AUTHD_ID
DECOY = SpiffeId.parse("spiffe://example.org/authd/node-a/decoy")


@contextlib.contextmanager
def short_dir() -> Iterator[Path]:
    """A fresh directory with a short path: Unix socket paths must stay under 108 bytes."""
    path = Path(tempfile.mkdtemp(prefix="asp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def options(directory: Path, **overrides: Any) -> DevSpireOptions:
    """dev-spire options for one node, ``node-a``, with authd's ID as authorized delegate."""
    values: dict[str, Any] = {
        "directory": directory,
        "trust_domain": TD,
        "nodes": ("node-a",),
        "authorized_delegates": (AUTHD_ID,),
    }
    values.update(overrides)
    return DevSpireOptions(**values)


def workload_endpoint(directory: Path, node: str = "node-a") -> Endpoint:
    return Endpoint.unix(workload_socket(directory, node))


def admin_endpoint(directory: Path, node: str = "node-a") -> Endpoint:
    return Endpoint.unix(admin_socket(directory, node))


def entry_socket(directory: Path) -> Path:
    return server_socket(directory)


def write_entries(path: Path, entries: list[dict[str, Any]]) -> Path:
    """An ``--entries`` TOML file."""
    lines = []
    for entry in entries:
        lines.append("[[entry]]")
        for key, value in entry.items():
            lines.append(f"{key} = {json.dumps(value)}")
    path.write_text("\n".join(lines) + "\n")
    return path


@contextlib.asynccontextmanager
async def running(opts: DevSpireOptions) -> AsyncIterator[DevSpire]:
    """dev-spire inside the test's event loop."""
    async with DevSpire(opts) as spire:
        loop = asyncio.create_task(spire.serve_forever())
        try:
            yield spire
        finally:
            loop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await loop


class DevSpireProcess:
    """``authd dev-spire`` as a child process, started and stopped by the test."""

    def __init__(self, args: list[str]) -> None:
        self.args = args
        self.proc: asyncio.subprocess.Process | None = None
        self.lines: list[str] = []

    async def start(self, within: float = 30.0) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "authd",
            "dev-spire",
            "--log-format",
            "json",
            *self.args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        await self.wait_for_log("dev-spire ready", within)

    async def wait_for_log(self, event: str, within: float) -> dict[str, Any]:
        assert self.proc is not None
        assert self.proc.stdout is not None
        async with asyncio.timeout(within):
            while True:
                line = (await self.proc.stdout.readline()).decode()
                if not line:
                    raise AssertionError(f"dev-spire exited before {event!r}: {self.lines}")
                self.lines.append(line)
                if line.startswith("{") and json.loads(line).get("event") == event:
                    return dict(json.loads(line))

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()

    async def terminate(self, within: float = 10.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(within):
            return await self.proc.wait()


async def next_event(
    events: Subscription, predicate: Callable[[SvidEvent], bool], within: float = 10.0
) -> SvidEvent:
    """The next store event satisfying ``predicate`` (others are skipped)."""
    async with asyncio.timeout(within):
        while True:
            event = await events.get()
            if event.kind is EventKind.RESYNC or predicate(event):
                return event


async def until(events: Subscription, condition: Callable[[], bool], within: float = 10.0) -> None:
    """Wait, event by event, until ``condition()`` holds (checked first, then after every event)."""
    async with asyncio.timeout(within):
        while not condition():
            await events.get()


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def node_a_config(directory: Path, extra: str = "") -> Path:
    """``authd run`` config for node-a against dev-spire in ``directory``, without a datapath.

    Writes a one-node cluster state file beside it; ``extra`` is appended (more sections).
    """
    cluster = directory / "cluster.toml"
    cluster.write_text('trust_domain = "example.org"\n[[node]]\nname = "node-a"\naddresses = ["127.0.0.1"]\n')
    config = directory / "authd.toml"
    config.write_text(
        f'[node]\nname = "node-a"\nstate_dir = "{directory}/state"\nruntime_dir = "{directory}/run"\n'
        '[log]\nformat = "json"\n'
        f'[cluster]\nfile = "{cluster}"\n'
        f'[attest]\nlisten_address = "127.0.0.1"\nport = {free_port()}\n'
        "[datapath]\nenabled = false\n"
        f'[spire]\nworkload_socket = "{directory}/node-a/public/api.sock"\n'
        f'admin_socket = "{directory}/node-a/private/admin.sock"\n'
        'reconnect_backoff_initial = "50ms"\nreconnect_backoff_max = "300ms"\n' + extra
    )
    return config


async def raw_fetch(
    socket: Path, metadata: tuple[tuple[str, str], ...] = ()
) -> workload_pb2.X509SVIDResponse:
    async with grpc.aio.insecure_channel(f"unix://{socket}") as channel:
        method = channel.unary_stream(
            FETCH_X509_SVID,
            request_serializer=workload_pb2.X509SVIDRequest.SerializeToString,
            response_deserializer=workload_pb2.X509SVIDResponse.FromString,
        )
        async for message in method(workload_pb2.X509SVIDRequest(), metadata=metadata):
            return message
    raise AssertionError("stream ended")


async def register_after_a_decoy(directory: Path) -> None:
    """Register DECOY and then authd's node ID for this uid, so that the agent lists the decoy first.

    dev-spire lists SVIDs by entry ID, as SPIRE does: authd's entry is registered again until it sorts
    after the decoy's, so the decoy is the first (default) SVID the agent sends.
    """
    parent = SpiffeId.from_parts(TD, "/spire/agent/node-a")
    socket = workload_socket(directory, "node-a")
    async with EntryClient(entry_socket(directory)) as entries:
        assert all(r.ok for r in await entries.create_entries([RegistrationEntry(DECOY, parent, (ME,))]))
        for _ in range(40):
            (created,) = await entries.create_entries([RegistrationEntry(AUTHD_ID, parent, (ME,))])
            assert created.ok, created
            listed = [svid.spiffe_id for svid in (await raw_fetch(socket, SECURITY_HEADER)).svids]
            if listed == [str(DECOY), str(AUTHD_ID)]:
                return
            assert [r.ok for r in await entries.delete_entries([created.id])] == [True]
    raise AssertionError("authd's entry never sorted after the decoy's")
