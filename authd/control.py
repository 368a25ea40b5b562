"""The daemon's local control socket: newline-delimited JSON over a Unix stream socket.

A client sends one request line ``{"op": "...", ...}`` and reads response lines until the daemon closes
the connection; a streaming op (``observe --follow``) keeps writing until the client goes away. A failed
request gets one ``{"error": "..."}`` line. Operations are registered by the components that serve them
(``server.register("observe", handler)``), so the server knows no op itself.

The socket is mode 0600 in the runtime directory (0700): only root talks to authd.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
from collections.abc import AsyncIterator, Callable, Generator
from pathlib import Path
from typing import Any

import structlog

from authd.errors import AuthdError, ControlError

log = structlog.get_logger(__name__)

SOCKET_NAME = "authd.sock"
MAX_LINE = 64 * 1024
MAX_CLIENTS = 16
REQUEST_TIMEOUT = 5.0

Request = dict[str, Any]
Response = dict[str, Any]
Handler = Callable[[Request], AsyncIterator[Response]]
"""Serves one op: an async generator of response objects; raise ControlError for a refusal."""


def socket_path(runtime_dir: Path) -> Path:
    """Where the control socket lives."""
    return runtime_dir / SOCKET_NAME


class ControlServer:
    """Serves registered ops to local clients; bounded clients, request size and request time."""

    def __init__(
        self,
        path: Path,
        *,
        max_clients: int = MAX_CLIENTS,
        request_timeout: float = REQUEST_TIMEOUT,
        on_listening: Callable[[], None] | None = None,
    ) -> None:
        """Listen at ``path`` once :meth:`run` starts; ``on_listening`` is called once it does."""
        self._on_listening = on_listening
        self.path = path
        self._handlers: dict[str, Handler] = {}
        self._slots = asyncio.Semaphore(max_clients)
        self._request_timeout = request_timeout
        self.refused = 0
        self.listening = asyncio.Event()

    def register(self, op: str, handler: Handler) -> None:
        """Serve ``op`` with ``handler``."""
        if op in self._handlers:
            raise ValueError(f"control: op {op!r} registered twice")
        self._handlers[op] = handler

    async def run(self) -> None:
        """Listen until cancelled; the socket file is removed on the way out."""
        server = await asyncio.start_unix_server(self._serve, sock=self._bind(), limit=MAX_LINE)
        try:
            self.listening.set()
            if self._on_listening is not None:
                self._on_listening()
            log.info("control socket listening", path=str(self.path))
            async with server:
                await server.serve_forever()
        finally:
            self.listening.clear()
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    def _bind(self) -> socket.socket:
        """Bind under a temporary name, restrict it to 0600, then rename it into place atomically.

        A stale socket from a previous run is replaced; no client ever sees a socket with wider access.
        """
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        staging = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        with contextlib.suppress(FileNotFoundError):
            staging.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(staging))
            staging.chmod(0o600)
            staging.replace(self.path)
        except OSError as err:
            sock.close()
            raise ControlError(f"control: cannot listen at {self.path}: {err.strerror}") from err
        return sock

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._slots.locked():
            self.refused += 1
            await self._send(writer, {"error": "control: too many clients"})
            writer.close()
            return
        async with self._slots:
            try:
                await self._converse(reader, writer)
            except (ConnectionError, BrokenPipeError):
                pass  # the client went away: nothing to answer
            finally:
                writer.close()
                with contextlib.suppress(ConnectionError, BrokenPipeError):
                    await writer.wait_closed()

    async def _converse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), self._request_timeout)
            request = json.loads(line)
        except (TimeoutError, ValueError) as err:  # ValueError: bad JSON or a line over MAX_LINE
            self.refused += 1
            await self._send(writer, {"error": f"control: bad request: {type(err).__name__}"})
            return
        if not isinstance(request, dict) or not isinstance(request.get("op"), str):
            self.refused += 1
            await self._send(writer, {"error": 'control: a request is an object with an "op" string'})
            return
        handler = self._handlers.get(request["op"])
        if handler is None:
            self.refused += 1
            await self._send(writer, {"error": f"control: unknown op {request['op']!r}"})
            return
        # A streaming op ends when the client closes its side: watch for that while streaming.
        hangup = asyncio.ensure_future(reader.read(1))
        stream = asyncio.ensure_future(self._stream(handler(request), writer))
        try:
            await asyncio.wait({hangup, stream}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (hangup, stream):
                task.cancel()
            await asyncio.gather(hangup, stream, return_exceptions=True)
        if stream.done() and not stream.cancelled() and stream.exception() is not None:
            raise stream.exception()  # type: ignore[misc]

    async def _stream(self, responses: AsyncIterator[Response], writer: asyncio.StreamWriter) -> None:
        try:
            async for response in responses:
                await self._send(writer, response)
        except AuthdError as err:
            await self._send(writer, {"error": str(err)})

    @staticmethod
    async def _send(writer: asyncio.StreamWriter, response: Response) -> None:
        writer.write(json.dumps(response, separators=(",", ":")).encode() + b"\n")
        await writer.drain()


class ControlClient:
    """Talks to the daemon's control socket (blocking; used by the CLI)."""

    def __init__(self, path: Path, *, timeout: float | None = 10.0) -> None:
        """``timeout`` bounds connecting and each read; None waits forever (``--follow``)."""
        self.path = path
        self.timeout = timeout

    def request(self, op: str, **fields: Any) -> Generator[Response, None, None]:  # noqa: ANN401 - JSON fields
        """Send one request and yield each response line; raise ControlError on an error line."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            try:
                sock.connect(str(self.path))
            except FileNotFoundError as err:
                raise ControlError(
                    f"control: no socket at {self.path}: is authd running?", not_running=True
                ) from err
            except ConnectionRefusedError as err:
                raise ControlError(
                    f"control: nothing listens at {self.path}: is authd running?", not_running=True
                ) from err
            except PermissionError as err:
                raise ControlError(f"control: permission denied on {self.path}: run as root") from err
            except OSError as err:
                raise ControlError(f"control: cannot connect to {self.path}: {err.strerror}") from err
            sock.sendall(json.dumps({"op": op, **fields}).encode() + b"\n")
            with sock.makefile("rb") as lines:
                for line in lines:
                    try:
                        response = json.loads(line)
                    except ValueError as err:
                        raise ControlError("control: the daemon sent a malformed line") from err
                    if not isinstance(response, dict):
                        raise ControlError("control: the daemon sent a malformed line")
                    if "error" in response:
                        raise ControlError(str(response["error"]))
                    yield response
        except TimeoutError as err:
            raise ControlError(f"control: no answer from {self.path} within {self.timeout}s") from err
        finally:
            sock.close()
