"""What dev-spire's RPC handlers share: the caller's identity, the security header, status errors.

grpclib (pure-Python asyncio gRPC) serves dev-spire because its streams expose the connection's socket,
and so the caller's kernel credentials; grpcio's servers do not show Unix peer credentials at all.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Mapping
from typing import Any, Protocol

from grpclib.const import Handler, Status
from grpclib.exceptions import GRPCError
from grpclib.server import Server, Stream
from h2.settings import SettingCodes

from authd.spire.dev.attestor import AttestationError, Caller, attest_socket

SECURITY_HEADER = "workload.spiffe.io"
UNLIMITED_STREAMS = 2**31 - 1


def require_security_header(stream: Stream[Any, Any]) -> None:
    """Exactly one ``workload.spiffe.io: true``, as SPIRE's agent demands on every Workload API call."""
    values = stream.metadata.getall(SECURITY_HEADER, []) if stream.metadata is not None else []
    if values != ["true"]:
        raise GRPCError(Status.INVALID_ARGUMENT, "security header missing from request")


def attest_caller(stream: Stream[Any, Any]) -> Caller:
    """Attest the process on the other end of the stream's connection, or fail like SPIRE does."""
    # grpclib has no public accessor for the transport's socket; Peer keeps the transport privately.
    transport = stream.peer._transport  # noqa: SLF001
    sock: socket.socket | None = transport.get_extra_info("socket")
    try:
        return attest_socket(sock)
    except AttestationError as err:
        raise GRPCError(Status.UNAVAILABLE, "workload attestation failed") from err


class Servable(Protocol):
    """A set of grpclib method handlers."""

    def __mapping__(self) -> Mapping[str, Handler]:
        """Wire path -> handler."""
        ...


class _ClosingProtocol(asyncio.Protocol):
    """Forwards to grpclib's protocol and remembers the live transport, so it can be closed on stop."""

    def __init__(self, inner: asyncio.Protocol, live: set[asyncio.BaseTransport]) -> None:
        self._inner = inner
        self._live = live
        self._transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        self._live.add(transport)
        self._inner.connection_made(transport)
        # h2 advertises at most 100 concurrent streams per connection; SPIRE's grpc-go server sets no
        # limit, and a client multiplexing more streams must not stall here when it would not there.
        connection = self._inner.connection  # type: ignore[attr-defined]  # grpclib's H2Protocol
        connection._connection.update_settings({SettingCodes.MAX_CONCURRENT_STREAMS: UNLIMITED_STREAMS})  # noqa: SLF001
        connection.flush()

    def data_received(self, data: bytes) -> None:
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._transport is not None:
            self._live.discard(self._transport)
        self._inner.connection_lost(exc)


class ClosingServer(Server):
    """grpclib's server that also closes open connections on close (asyncio does so only from 3.13)."""

    def __init__(self, handlers: list[Servable], **options: Any) -> None:  # noqa: ANN401
        """Serve ``handlers``; ``options`` go to grpclib's Server (e.g. ``codec``)."""
        super().__init__(handlers, **options)
        self.live: set[asyncio.BaseTransport] = set()

    def _protocol_factory(self) -> Any:  # noqa: ANN401 - grpclib's per-connection hook, wrapped
        return _ClosingProtocol(super()._protocol_factory(), self.live)

    def close(self) -> None:
        """Stop accepting, cancel handlers, and close every open connection."""
        super().close()
        for transport in list(self.live):
            transport.close()
