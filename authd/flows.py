"""The flow log behind ``authd observe`` and Hubble's ``GetFlows``: recent history and followers.

The daemon turns each datapath flow event into a Hubble ``flow.Flow`` when it arrives (handles resolve
to names now; a handle may be reused later), keeps the last few thousand (and, in
:mod:`authd.hubble.history`, the recent ones on disk, read back after a restart), and fans new ones out to
followers through bounded queues: a slow follower loses flows, counted and reported to it as a
``lost_events`` response, and never slows the ring-buffer consumer. :func:`get_flows` answers one
``observer.GetFlowsRequest`` (``number``/``first``, ``since``/``until``, ``follow``, white- and
blacklists); :mod:`authd.hubble.server` serves it over gRPC.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import AsyncGenerator, Callable, Iterator

from google.protobuf.timestamp_pb2 import Timestamp

from authd.datapath.events import FlowEvent
from authd.errors import ControlError
from authd.hubble._proto import flow_pb2, observer_pb2
from authd.hubble.convert import IdentityNames, flow_from_event
from authd.hubble.filters import Predicate, compile_lists
from authd.hubble.history import FlowHistory

RING_CAPACITY = 4096
FOLLOWER_QUEUE = 1024
MAX_FOLLOWERS = 16


class Follower:
    """A client following new flows through a bounded queue."""

    def __init__(self, wanted: Predicate, capacity: int) -> None:
        """Follow flows for which ``wanted`` holds."""
        self.wanted = wanted
        self._queue: asyncio.Queue[flow_pb2.Flow] = asyncio.Queue(maxsize=capacity)
        self.lost = 0

    def offer(self, flow: flow_pb2.Flow) -> None:
        """Queue a flow without waiting; count it as lost when the queue is full."""
        if not self.wanted(flow):
            return
        try:
            self._queue.put_nowait(flow)
        except asyncio.QueueFull:
            self.lost += 1

    async def next(self) -> tuple[flow_pb2.Flow, int]:
        """The next flow, and how many were lost before it since the last call."""
        flow = await self._queue.get()
        lost, self.lost = self.lost, 0
        return flow, lost


class FlowLog:
    """The last flows, and the clients following new ones."""

    def __init__(
        self,
        names: IdentityNames,
        *,
        capacity: int = RING_CAPACITY,
        follower_queue: int = FOLLOWER_QUEUE,
        max_followers: int = MAX_FOLLOWERS,
        clock: Callable[[], float] = time.monotonic,
        history: FlowHistory | None = None,
    ) -> None:
        """Keep ``capacity`` flows; each follower may lag ``follower_queue`` flows before losing any.

        With ``history``, the kept flows start as the last ones it holds, and each new one is written to it.
        """
        self._names = names
        self.capacity = capacity
        self._ring: collections.deque[flow_pb2.Flow] = collections.deque(maxlen=capacity)
        self._history = history
        if history is not None:
            self._ring.extend(history.load())
        self._follower_queue = follower_queue
        self._max_followers = max_followers
        self._followers: set[Follower] = set()
        self._clock = clock
        self.started = clock()
        self.total = 0

    @property
    def node_name(self) -> str:
        """The name of the node whose flows these are."""
        return self._names.node_name(0) or ""

    def uptime(self) -> float:
        """Seconds since the log started."""
        return self._clock() - self.started

    def add(self, event: FlowEvent) -> None:
        """Record an event and hand it to every follower (never blocks)."""
        self.record(flow_from_event(event, self._names))

    def record(self, flow: flow_pb2.Flow) -> None:
        """Record a flow already in Hubble's form."""
        self._ring.append(flow)
        self.total += 1
        if self._history is not None:
            self._history.append(flow)
        for follower in self._followers:
            follower.offer(flow)

    def follow(self, wanted: Predicate) -> Follower:
        """Start following; call :meth:`unfollow` when done."""
        if len(self._followers) >= self._max_followers:
            raise ControlError(f"control: too many followers (at most {self._max_followers})")
        follower = Follower(wanted, self._follower_queue)
        self._followers.add(follower)
        return follower

    def unfollow(self, follower: Follower) -> None:
        """Stop handing flows to ``follower``."""
        self._followers.discard(follower)

    def __len__(self) -> int:
        """How many flows are kept."""
        return len(self._ring)

    def __iter__(self) -> Iterator[flow_pb2.Flow]:
        """The kept flows, oldest first."""
        return iter(self._ring)


def _response(flow: flow_pb2.Flow) -> observer_pb2.GetFlowsResponse:
    return observer_pb2.GetFlowsResponse(flow=flow, node_name=flow.node_name, time=flow.time)


def _lost(count: int, node: str) -> observer_pb2.GetFlowsResponse:
    now = Timestamp()
    now.GetCurrentTime()
    lost = flow_pb2.LostEvent(source=flow_pb2.OBSERVER_EVENTS_QUEUE, num_events_lost=count)
    return observer_pb2.GetFlowsResponse(lost_events=lost, node_name=node, time=now)


async def get_flows(
    flow_log: FlowLog, request: observer_pb2.GetFlowsRequest
) -> AsyncGenerator[observer_pb2.GetFlowsResponse, None]:
    """Answer ``GetFlows``: matching kept flows, then (``follow``) new ones until ``until`` passes.

    ``number`` keeps the last (with ``first``, the first) N of the kept flows that match; 0 means all of
    them, except with ``follow`` and no ``since``, where only new flows come. Raise ControlError (a
    FilterError for filters) for a request that cannot be answered faithfully.
    """
    if request.first and request.follow:
        raise ControlError("hubble: first is incompatible with follow")
    matches = compile_lists(request.whitelist, request.blacklist)
    since = request.since.ToNanoseconds() if request.HasField("since") else None
    until = request.until.ToNanoseconds() if request.HasField("until") else None

    def in_window(flow: flow_pb2.Flow) -> bool:
        at = flow.time.ToNanoseconds()
        return (since is None or at >= since) and (until is None or at <= until)

    def wanted(flow: flow_pb2.Flow) -> bool:
        return in_window(flow) and matches(flow)

    # Subscribe before replaying history so nothing falls between the two.
    follower = flow_log.follow(matches) if request.follow else None
    try:
        history = (
            ()
            if request.follow and request.number == 0 and since is None
            else _history(flow_log, request, wanted)
        )
        for flow in history:
            yield _response(flow)
        while follower is not None:
            flow, lost = await follower.next()
            if lost:
                yield _lost(lost, flow_log.node_name)
            if until is not None and flow.time.ToNanoseconds() > until:
                return
            yield _response(flow)
    finally:
        if follower is not None:
            flow_log.unfollow(follower)


def _history(
    flow_log: FlowLog, request: observer_pb2.GetFlowsRequest, wanted: Predicate
) -> list[flow_pb2.Flow]:
    kept = [flow for flow in flow_log if wanted(flow)]
    if not request.number:
        return kept
    number = int(request.number)
    return kept[:number] if request.first else kept[-number:]


def server_status(flow_log: FlowLog, version: str) -> observer_pb2.ServerStatusResponse:
    """Answer ``ServerStatus`` for this node."""
    return observer_pb2.ServerStatusResponse(
        num_flows=len(flow_log),
        max_flows=flow_log.capacity,
        seen_flows=flow_log.total,
        uptime_ns=int(flow_log.uptime() * 1e9),
        version=f"authd {version}",
    )
