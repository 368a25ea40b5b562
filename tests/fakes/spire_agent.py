"""A scripted SPIRE agent: serves whatever a test queues, including garbage, on real Unix-socket gRPC.

Each method has a queue of steps. A stream opened on a method sends queued messages as they come;
a :class:`End` step ends the stream with a status. The next stream the client opens (after its
backoff) continues with the next steps, so a test scripts reconnects too. Messages are protobuf objects
or raw ``bytes`` sent as the message body unparsed (a client then fails to decode them).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from google.protobuf.message import Message
from grpclib.const import Cardinality, Handler, Status
from grpclib.encoding.base import CodecBase
from grpclib.encoding.proto import ProtoCodec
from grpclib.exceptions import GRPCError
from grpclib.server import Stream

from authd.spire._proto import delegatedidentity_pb2, workload_pb2
from authd.spire.dev.calls import ClosingServer

WORKLOAD_SVIDS = "/SpiffeWorkloadAPI/FetchX509SVID"
DELEGATED_SVIDS = "/spire.api.agent.delegatedidentity.v1.DelegatedIdentity/SubscribeToX509SVIDs"
DELEGATED_BUNDLES = "/spire.api.agent.delegatedidentity.v1.DelegatedIdentity/SubscribeToX509Bundles"


@dataclass(frozen=True)
class End:
    """End the current stream with this status."""

    status: Status
    message: str = ""


class _RawOrProtoCodec(CodecBase):
    """Protobuf as usual, except ``bytes`` replies go out exactly as given."""

    __content_subtype__ = "proto"

    def __init__(self) -> None:
        self._proto = ProtoCodec()

    def encode(self, message: Any, message_type: Any) -> bytes:
        if isinstance(message, bytes):
            return message
        return self._proto.encode(message, message_type)

    def decode(self, data: bytes, message_type: Any) -> Any:
        return self._proto.decode(data, message_type)


class FakeSpireAgent:
    """One Unix socket serving the scripted Workload API and Delegated Identity API streams."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.steps: dict[str, asyncio.Queue[Message | bytes | End]] = {
            WORKLOAD_SVIDS: asyncio.Queue(),
            DELEGATED_SVIDS: asyncio.Queue(),
            DELEGATED_BUNDLES: asyncio.Queue(),
        }
        self.opened: dict[str, int] = dict.fromkeys(self.steps, 0)
        self.metadata: list[dict[str, str]] = []
        self.requests: list[Any] = []
        self._server: ClosingServer | None = None

    def queue(self, method: str, *steps: Message | bytes | End) -> None:
        for step in steps:
            self.steps[method].put_nowait(step)

    def __mapping__(self) -> dict[str, Handler]:
        return {
            WORKLOAD_SVIDS: Handler(
                self._handler(WORKLOAD_SVIDS),
                Cardinality.UNARY_STREAM,
                workload_pb2.X509SVIDRequest,
                workload_pb2.X509SVIDResponse,
            ),
            DELEGATED_SVIDS: Handler(
                self._handler(DELEGATED_SVIDS),
                Cardinality.UNARY_STREAM,
                delegatedidentity_pb2.SubscribeToX509SVIDsRequest,
                delegatedidentity_pb2.SubscribeToX509SVIDsResponse,
            ),
            DELEGATED_BUNDLES: Handler(
                self._handler(DELEGATED_BUNDLES),
                Cardinality.UNARY_STREAM,
                delegatedidentity_pb2.SubscribeToX509BundlesRequest,
                delegatedidentity_pb2.SubscribeToX509BundlesResponse,
            ),
        }

    def _handler(self, method: str) -> Any:
        async def handle(stream: Stream[Any, Any]) -> None:
            request = await stream.recv_message()
            self.requests.append(request)
            self.metadata.append({key: str(value) for key, value in (stream.metadata or {}).items()})
            self.opened[method] += 1
            while True:
                step = await self.steps[method].get()
                if isinstance(step, End):
                    raise GRPCError(step.status, step.message)
                await stream.send_message(step)

        return handle

    async def start(self) -> None:
        self._server = ClosingServer([self], codec=_RawOrProtoCodec())
        await self._server.start(path=str(self.path))

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        self.path.unlink(missing_ok=True)
