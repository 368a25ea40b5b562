"""Following a SPIRE server stream across failures, and the one rule for what is retried.

SPIRE pushes every change (rotation, bundle, entry) as a full new message on a long-lived stream. A
follower opens the stream, hands each message to a handler, and when the stream fails or ends decides
once, in :func:`classify`, whether trying again can help (SPIFFE Workload Endpoint section 5):

* ``INVALID_ARGUMENT`` and ``UNIMPLEMENTED`` stop: the request itself is wrong or the API is missing.
* Everything else backs off and retries: ``UNAVAILABLE`` (agent restarting), ``PERMISSION_DENIED`` (no
  identity yet, or no longer), any other status, a stream the server ended, a socket not there yet.

The backoff is reset by every message received, so a stream that worked for an hour and then broke
starts again from the initial delay.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol, TypeVar

import grpc
import structlog

from authd.backoff import BackoffFactory
from authd.errors import SpireError

log = structlog.get_logger(__name__)

M = TypeVar("M")
M_contra = TypeVar("M_contra", contravariant=True)

Sleep = Callable[[float], Awaitable[None]]

STOP_CODES = frozenset({grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNIMPLEMENTED})


@dataclass(frozen=True, slots=True)
class StreamFailure:
    """Why a stream stopped: the gRPC status (None when no status was received) and the verdict."""

    code: grpc.StatusCode | None
    error: SpireError

    @property
    def retryable(self) -> bool:
        """Whether backing off and reopening the stream can help."""
        return self.error.retryable


def classify(err: BaseException, name: str) -> StreamFailure:
    """Decide what a stream failure means; the only place authd decides what is retried."""
    if isinstance(err, grpc.aio.AioRpcError):
        code = err.code()
        detail = err.details() or ""
        return StreamFailure(
            code,
            SpireError(f"spire: {name}: {code.name} {detail!r}".rstrip(), retryable=code not in STOP_CODES),
        )
    if isinstance(err, SpireError):
        return StreamFailure(None, err)
    if isinstance(err, OSError):
        return StreamFailure(None, SpireError(f"spire: {name}: {err}", retryable=True))
    raise TypeError(f"spire: cannot classify {type(err).__name__}") from err


def stream_ended(name: str) -> StreamFailure:
    """A stream the server closed with OK: SPIRE never does that on purpose, so reconnect."""
    return StreamFailure(grpc.StatusCode.OK, SpireError(f"spire: {name}: stream ended", retryable=True))


class StreamStatus(Protocol):
    """Where a follower reports whether its stream is up (the health of the identity plane)."""

    def stream_up(self, name: str) -> None:
        """A message arrived on ``name``."""
        ...

    def stream_down(self, name: str, reason: str) -> None:
        """``name`` failed and is being retried (or has stopped)."""
        ...

    def stream_closed(self, name: str) -> None:
        """``name`` was closed on purpose (its workloads left the node); forget it."""
        ...


class StreamHandler(Protocol[M_contra]):
    """What a follower does with messages and failures."""

    def on_message(self, message: M_contra) -> None:
        """Apply one message; bad content is rejected and counted, not raised.

        Raising a non-retryable SpireError stops following (the agent will never give what is needed).
        """
        ...

    def on_undecodable(self) -> None:
        """A message arrived that is not even valid protobuf (gRPC logged the parse error)."""
        ...

    def on_failure(self, failure: StreamFailure) -> None:
        """React to a failure before the retry decision (e.g. redact SVIDs on PERMISSION_DENIED)."""
        ...


async def follow(
    name: str,
    open_stream: Callable[[], AsyncGenerator[M, None]],
    handler: StreamHandler[M],
    *,
    backoff: BackoffFactory,
    status: StreamStatus,
    sleep: Sleep = asyncio.sleep,
) -> None:
    """Follow the stream ``open_stream()`` opens, forever; raise SpireError on a non-retryable failure."""
    delays = backoff()
    while True:
        try:
            async with contextlib.aclosing(open_stream()) as messages:
                async for message in messages:
                    delays.reset()
                    status.stream_up(name)
                    # grpc.aio hands over None, and carries on, when a message fails to deserialize.
                    if message is None:
                        handler.on_undecodable()
                    else:
                        handler.on_message(message)
            failure = stream_ended(name)
        except (grpc.aio.AioRpcError, SpireError, OSError) as err:
            failure = classify(err, name)
        handler.on_failure(failure)
        status.stream_down(name, str(failure.error))
        if not failure.retryable:
            log.error("spire stream refused, not retrying", stream=name, error=str(failure.error))
            raise failure.error
        delay = delays.next_delay()
        log.warning(
            "spire stream lost, reconnecting",
            stream=name,
            error=str(failure.error),
            retry_in_s=round(delay, 3),
        )
        await sleep(delay)


def unwrap_spire_error(failures: BaseExceptionGroup[BaseException]) -> BaseException:
    """The first SpireError inside a task group's failures (what a job reports), else the group itself."""
    for failure in failures.exceptions:
        if isinstance(failure, SpireError):
            return failure
        if isinstance(failure, BaseExceptionGroup):
            inner = unwrap_spire_error(failure)
            if inner is not failure:
                return inner
    return failures
