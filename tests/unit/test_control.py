from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import stat
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from authd.control import ControlClient, ControlServer
from authd.errors import ControlError


async def echo(request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
    for index in range(int(request.get("count", 1))):
        yield {"index": index, "text": request.get("text")}


async def refuse(request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
    del request
    yield {"partial": True}
    raise ControlError("control: not today")


class Forever:
    def __init__(self) -> None:
        self.open = 0

    async def __call__(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        del request
        self.open += 1
        try:
            yield {"started": True}
            await asyncio.Event().wait()
        finally:
            self.open -= 1


@contextlib.asynccontextmanager
async def serving(tmp_path: Path, **kwargs: Any) -> AsyncIterator[ControlServer]:
    server = ControlServer(tmp_path / "run" / "authd.sock", **kwargs)
    server.register("echo", echo)
    server.register("refuse", refuse)
    task = asyncio.create_task(server.run())
    await asyncio.wait_for(server.listening.wait(), 5)
    try:
        yield server
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def ask(path: Path, op: str, **fields: Any) -> list[dict[str, Any]]:
    return list(ControlClient(path, timeout=5).request(op, **fields))


async def test_request_and_streamed_responses(tmp_path: Path) -> None:
    async with serving(tmp_path) as server:
        mode = stat.S_IMODE(server.path.stat().st_mode)
        assert mode == 0o600
        assert stat.S_IMODE(server.path.parent.stat().st_mode) == 0o700
        responses = await asyncio.to_thread(ask, server.path, "echo", count=3, text="hi")
    assert responses == [{"index": i, "text": "hi"} for i in range(3)]
    assert not server.path.exists()  # removed on the way out


async def test_errors_come_back_as_control_errors(tmp_path: Path) -> None:
    async with serving(tmp_path) as server:
        with pytest.raises(ControlError, match="unknown op 'nope'"):
            await asyncio.to_thread(ask, server.path, "nope")
        with pytest.raises(ControlError, match="not today"):
            await asyncio.to_thread(ask, server.path, "refuse")
        assert server.refused == 1


async def test_malformed_requests_are_refused_and_the_server_keeps_serving(tmp_path: Path) -> None:
    async with serving(tmp_path, request_timeout=0.2) as server:

        def raw(data: bytes) -> dict[str, Any]:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(5)
                sock.connect(str(server.path))
                sock.sendall(data)
                reply: dict[str, Any] = json.loads(sock.makefile("rb").readline())
                return reply

        assert "bad request" in (await asyncio.to_thread(raw, b"{not json\n"))["error"]
        assert '"op"' in (await asyncio.to_thread(raw, b"[1, 2]\n"))["error"]
        assert '"op"' in (await asyncio.to_thread(raw, b'{"op": 5}\n'))["error"]
        assert "bad request" in (await asyncio.to_thread(raw, b"x" * 70000 + b"\n"))["error"]
        assert "bad request" in (await asyncio.to_thread(raw, b""))["error"]  # silent client: timed out
        assert await asyncio.to_thread(ask, server.path, "echo") == [{"index": 0, "text": None}]
        assert server.refused == 5


async def test_a_stream_ends_when_the_client_goes_away(tmp_path: Path) -> None:
    forever = Forever()
    async with serving(tmp_path) as server:
        server.register("forever", forever)

        def start_and_leave() -> dict[str, Any]:
            responses = ControlClient(server.path, timeout=5).request("forever")
            first = next(responses)
            responses.close()  # closes the socket
            return first

        assert await asyncio.to_thread(start_and_leave) == {"started": True}
        for _ in range(100):
            if forever.open == 0:
                break
            await asyncio.sleep(0.01)
        assert forever.open == 0


async def test_clients_are_bounded(tmp_path: Path) -> None:
    forever = Forever()
    async with serving(tmp_path, max_clients=1) as server:
        server.register("forever", forever)
        held = ControlClient(server.path, timeout=5).request("forever")
        assert await asyncio.to_thread(next, held) == {"started": True}
        with pytest.raises(ControlError, match="too many clients"):
            await asyncio.to_thread(ask, server.path, "echo")
        held.close()


def test_client_says_when_the_daemon_is_not_running(tmp_path: Path) -> None:
    with pytest.raises(ControlError, match="is authd running"):
        ask(tmp_path / "absent.sock", "echo")


def test_a_registered_op_cannot_be_replaced(tmp_path: Path) -> None:
    server = ControlServer(tmp_path / "s.sock")
    server.register("echo", echo)
    with pytest.raises(ValueError, match="twice"):
        server.register("echo", echo)
