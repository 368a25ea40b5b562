"""What dev-spire's RPC handlers share: the caller's identity, the security header, status errors.

grpclib (pure-Python asyncio gRPC) serves dev-spire because its streams expose the connection's socket,
and so the caller's kernel credentials; grpcio's servers do not show Unix peer credentials at all.
"""

from __future__ import annotations

import socket
from typing import Any

from grpclib.const import Status
from grpclib.exceptions import GRPCError
from grpclib.server import Stream

from authd.spire.dev.attestor import AttestationError, Caller, attest_socket

SECURITY_HEADER = "workload.spiffe.io"


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
