"""Hubble's ``observer.Observer`` gRPC service on a local Unix socket (and, if asked, loopback TCP).

``GetFlows`` and ``ServerStatus`` are served from the daemon's flow log, so the Hubble CLI, Hubble Relay
and ``authd observe`` read the same flows; the other Observer methods answer UNIMPLEMENTED. A request
authd cannot answer faithfully (a filter on pods, a field it does not know) is INVALID_ARGUMENT. The
socket is 0600 inside the 0700 runtime directory: only root reads flows.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import structlog

from authd import __version__
from authd.errors import ControlError
from authd.flows import FlowLog, get_flows, server_status
from authd.hubble._proto import observer_pb2

log = structlog.get_logger(__name__)

SERVICE = "observer.Observer"
SOCKET_NAME = "hubble.sock"
GRACE = 1.0


class ObserverServer:
    """Serves GetFlows and ServerStatus from ``flow_log`` (None: the datapath is off, nothing to serve)."""

    def __init__(
        self,
        flow_log: FlowLog | None,
        path: Path,
        *,
        tcp_port: int | None = None,
        on_listening: Callable[[str], None] | None = None,
    ) -> None:
        """Listen at ``path`` (and 127.0.0.1:``tcp_port``) once :meth:`run` starts."""
        self._flow_log = flow_log
        self.path = path
        self._tcp_port = tcp_port
        self._on_listening = on_listening
        self.tcp_bound: int | None = None

    async def _get_flows(
        self, request: observer_pb2.GetFlowsRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> AsyncIterator[observer_pb2.GetFlowsResponse]:
        if self._flow_log is None:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION, "the datapath is disabled ([datapath] enabled = false)"
            )
        try:
            async for response in get_flows(self._flow_log, request):
                yield response
        except ControlError as err:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))

    async def _server_status(
        self, request: observer_pb2.ServerStatusRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> observer_pb2.ServerStatusResponse:
        del request, context
        if self._flow_log is None:
            return observer_pb2.ServerStatusResponse(version=f"authd {__version__}")
        return server_status(self._flow_log, __version__)

    def _handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "GetFlows": grpc.unary_stream_rpc_method_handler(
                    self._get_flows,
                    request_deserializer=observer_pb2.GetFlowsRequest.FromString,
                    response_serializer=observer_pb2.GetFlowsResponse.SerializeToString,
                ),
                "ServerStatus": grpc.unary_unary_rpc_method_handler(
                    self._server_status,
                    request_deserializer=observer_pb2.ServerStatusRequest.FromString,
                    response_serializer=observer_pb2.ServerStatusResponse.SerializeToString,
                ),
            },
        )

    async def run(self) -> None:
        """Serve until cancelled; the socket file is removed on the way out."""
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # a stale socket from a previous run
        # Bound under a staging name, restricted to 0600, then renamed into place: no client ever sees
        # the socket with wider access.
        staging = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        with contextlib.suppress(FileNotFoundError):
            staging.unlink()
        server = grpc.aio.server()
        server.add_generic_rpc_handlers([self._handler()])
        server.add_insecure_port(f"unix:{staging}")
        where = [f"unix:{self.path}"]
        if self._tcp_port is not None:
            self.tcp_bound = server.add_insecure_port(f"127.0.0.1:{self._tcp_port}")
            where.append(f"127.0.0.1:{self.tcp_bound}")
        await server.start()
        try:
            staging.chmod(0o600)
            staging.replace(self.path)
            log.info("hubble observer serving", addresses=where)
            if self._on_listening is not None:
                self._on_listening(", ".join(where))
            await asyncio.Future()  # serve until cancelled
        finally:
            await server.stop(GRACE)
            self.tcp_bound = None
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
