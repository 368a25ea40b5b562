"""A small grpc.aio client for the part of etcd's v3 API cluster state needs: Range, Txn, Watch, Compact.

Written over our own copy of etcd's protos (``_proto/etcd.proto``), as the SPIRE clients are, rather than
taken from PyPI: the asyncio etcd libraries there are thin, young or unmaintained wrappers that would
bring their own retry and reconnect policy; authd needs four calls with its own fail-static policy
(docs/architecture.md, "Cluster state in etcd").

One channel at a time, to one member of ``endpoints``; a failed call moves the client to the next member,
and the caller (the source's retry loop, or a CLI command) decides whether to try again. Reads are
linearizable (served through the leader's quorum), so a member cut off from the others answers with an
error instead of stale data; watches carry etcd's ``hasleader`` metadata, so a member that loses its
leader cancels them instead of going quiet.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import grpc
from google.protobuf.message import Message

from authd.cluster._proto import etcd_pb2 as pb
from authd.config.model import EtcdConfig
from authd.errors import EtcdCompactedError, EtcdError

M = TypeVar("M", bound=Message)

_RANGE = "/etcdserverpb.KV/Range"
_TXN = "/etcdserverpb.KV/Txn"
_COMPACT = "/etcdserverpb.KV/Compact"
_WATCH = "/etcdserverpb.Watch/Watch"
_LEADER_REQUIRED = (("hasleader", "true"),)
_MAX_MESSAGE = 64 * 1024 * 1024
_CHANNEL_OPTIONS = (
    ("grpc.max_receive_message_length", _MAX_MESSAGE),
    # etcd's server refuses pings more often than --grpc-keepalive-min-time (5 s) with GOAWAY.
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
)
_RETRYABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.UNKNOWN,  # etcd answers "no leader" and "leader changed" as UNKNOWN or UNAVAILABLE
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)


def prefix_end(prefix: bytes) -> bytes:
    """The end of the key range holding every key that starts with ``prefix`` (etcd's convention)."""
    trimmed = prefix.rstrip(b"\xff")
    return trimmed[:-1] + bytes([trimmed[-1] + 1]) if trimmed else b"\x00"


@dataclass(frozen=True, slots=True)
class Change:
    """One key changed at ``revision``: its new value, or None when it was deleted."""

    key: bytes
    value: bytes | None
    revision: int


class EtcdClient:
    """Range, Txn, Watch and Compact against the members of one etcd cluster."""

    def __init__(self, config: EtcdConfig) -> None:
        """Talk to ``config.endpoints`` with its TLS files and timeouts; connects on first use."""
        self._config = config
        self._index = 0
        self._channel: grpc.aio.Channel | None = None
        self._credentials = _credentials(config)

    @property
    def endpoint(self) -> str:
        """The member the client talks to now."""
        return self._config.endpoints[self._index]

    async def close(self) -> None:
        """Close the channel."""
        if self._channel is not None:
            channel, self._channel = self._channel, None
            await channel.close()

    async def snapshot(self, prefix: bytes) -> tuple[int, dict[bytes, bytes]]:
        """Every key under ``prefix`` with its value, at one revision, and that revision."""
        request = pb.RangeRequest(key=prefix, range_end=prefix_end(prefix))
        response = await self._unary(_RANGE, request, pb.RangeResponse, "read cluster state")
        return response.header.revision, {kv.key: kv.value for kv in response.kvs}

    async def replace(self, prefix: bytes, items: Mapping[bytes, bytes]) -> tuple[int, int]:
        """Make the keys under ``prefix`` exactly ``items`` in one transaction; return (revision, ops).

        Only changed keys are written and only vanished ones deleted, so watchers see the difference. The
        transaction succeeds only if nothing under ``prefix`` changed since it was read; a concurrent
        writer makes it fail with a retryable EtcdError.
        """
        revision, current = await self.snapshot(prefix)
        ops = [
            pb.RequestOp(request_delete_range=pb.DeleteRangeRequest(key=key))
            for key in sorted(current.keys() - items.keys())
        ]
        ops += [
            pb.RequestOp(request_put=pb.PutRequest(key=key, value=value))
            for key, value in sorted(items.items())
            if current.get(key) != value
        ]
        if not ops:
            return revision, 0
        unchanged = pb.Compare(
            result=pb.Compare.LESS,
            target=pb.Compare.MOD,
            key=prefix,
            range_end=prefix_end(prefix),
            mod_revision=revision + 1,
        )
        request = pb.TxnRequest(compare=[unchanged], success=ops)
        response = await self._unary(_TXN, request, pb.TxnResponse, "write cluster state")
        if not response.succeeded:
            raise EtcdError("etcd: cluster state changed while it was being written; try again")
        return response.header.revision, len(ops)

    async def compact(self, revision: int) -> None:
        """Drop history before ``revision`` (operators and tests; authd itself never compacts)."""
        await self._unary(_COMPACT, pb.CompactionRequest(revision=revision), pb.CompactionResponse, "compact")

    async def watch(self, prefix: bytes, start_revision: int) -> AsyncIterator[list[Change]]:
        """Yield the changes under ``prefix`` from ``start_revision`` on, one list per batch etcd sends.

        The first list is empty: it says the watch is established (etcd reachable, with a leader).

        Raise EtcdCompactedError when ``start_revision`` is no longer in etcd's history, EtcdError when the
        stream fails or the member loses its leader. A batch never splits one revision.
        """
        create = pb.WatchCreateRequest(
            key=prefix, range_end=prefix_end(prefix), start_revision=start_revision, progress_notify=True
        )
        method = self._connect().stream_stream(
            _WATCH,
            request_serializer=pb.WatchRequest.SerializeToString,
            response_deserializer=pb.WatchResponse.FromString,
        )
        call = method(iter([pb.WatchRequest(create_request=create)]), metadata=_LEADER_REQUIRED)
        try:
            async for response in call:
                if response.compact_revision:
                    raise EtcdCompactedError(
                        f"etcd: revision {start_revision} is compacted (oldest kept: "
                        f"{response.compact_revision})",
                        response.compact_revision,
                    )
                if response.canceled:
                    raise EtcdError(f"etcd: {self.endpoint} cancelled the watch: {response.cancel_reason}")
                if response.created or response.events:
                    # The empty batch of a created watch tells the caller etcd answers again.
                    yield [_change(event) for event in response.events]
        except grpc.aio.AioRpcError as err:
            raise await self._failed("watch cluster state", err) from err
        finally:
            call.cancel()
        endpoint = self.endpoint
        await self._next_member()
        raise EtcdError(f"etcd: the watch stream at {endpoint} ended")

    async def _unary(self, path: str, request: Message, response_type: type[M], doing: str) -> M:
        method = self._connect().unary_unary(
            path,
            request_serializer=_serialize,
            response_deserializer=response_type.FromString,
        )
        try:
            response: M = await method(request, timeout=self._config.request_timeout.total_seconds())
        except grpc.aio.AioRpcError as err:
            raise await self._failed(doing, err) from err
        return response

    def _connect(self) -> grpc.aio.Channel:
        if self._channel is None:
            target = self.endpoint.partition("://")[2]
            # gRPC gives up on one connection attempt (TCP, then TLS) after its minimum reconnect backoff:
            # a member that never answers fails the call in dial_timeout, and the next member is tried.
            dial = int(self._config.dial_timeout.total_seconds() * 1000)
            options = (*_CHANNEL_OPTIONS, ("grpc.min_reconnect_backoff_ms", dial))
            if self._credentials is None:
                self._channel = grpc.aio.insecure_channel(target, options=options)
            else:
                self._channel = grpc.aio.secure_channel(target, self._credentials, options=options)
        return self._channel

    async def _failed(self, doing: str, err: grpc.aio.AioRpcError) -> EtcdError:
        """Wrap a failed call; a transient failure moves the client on to the next member."""
        code = err.code()
        retryable = code in _RETRYABLE
        endpoint = self.endpoint
        if retryable:
            await self._next_member()
        return EtcdError(
            f"etcd: cannot {doing} at {endpoint}: {code.name}: {err.details()}", retryable=retryable
        )

    async def _next_member(self) -> None:
        await self.close()
        self._index = (self._index + 1) % len(self._config.endpoints)


def _serialize(message: Message) -> bytes:
    return message.SerializeToString()


def _change(event: pb.Event) -> Change:
    deleted = event.type == pb.Event.DELETE
    return Change(event.kv.key, None if deleted else event.kv.value, event.kv.mod_revision)


def _credentials(config: EtcdConfig) -> grpc.ChannelCredentials | None:
    """TLS credentials for https endpoints (the CA file, and the client pair if configured)."""
    if not any(endpoint.startswith("https://") for endpoint in config.endpoints):
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=_read(config.ca_file),
        private_key=_read(config.key_file),
        certificate_chain=_read(config.cert_file),
    )


def _read(path: Path | None) -> bytes | None:
    if path is None:
        return None
    try:
        return path.read_bytes()
    except OSError as err:
        raise EtcdError(f"etcd: cannot read {path}: {err.strerror}", retryable=False) from err
