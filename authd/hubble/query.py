"""``authd observe``'s side of GetFlows: Hubble's flags as a request, and the flows of several nodes.

:class:`Query` turns ``hubble observe``-style flags into one ``observer.GetFlowsRequest``. A criterion
that may hold on either side (``--ip``, ``--port``, ``--identity``) doubles the whitelist, one filter for
each side, as Hubble's CLI does. :func:`flows` asks each node's Observer (a Unix socket or
``host:port``) and yields the answers: oldest first across nodes for a snapshot, as they come while
following.
"""

from __future__ import annotations

import queue
import re
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import grpc

from authd.errors import AuthdError, ControlError
from authd.hubble._proto import flow_pb2, observer_pb2
from authd.hubble.convert import SPIFFE_LABEL

DEFAULT_LAST = 20
GET_FLOWS = "/observer.Observer/GetFlows"
CONNECT_TIMEOUT = 2.0  # seconds to reach the observer socket before saying authd is not there
SNAPSHOT_TIMEOUT = 30.0
VERDICTS = {
    "FORWARDED": flow_pb2.FORWARDED,
    "DROPPED": flow_pb2.DROPPED,
    "ALLOWED": flow_pb2.FORWARDED,
    "DENIED": flow_pb2.DROPPED,
}
DIRECTIONS = {"INGRESS": flow_pb2.INGRESS, "EGRESS": flow_pb2.EGRESS}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_DURATIONS = re.compile(r"(?:\d+(?:\.\d+)?(?:ms|s|m|h|d))+")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_time(text: str, now: datetime) -> datetime:
    """``10m``, ``1h30m`` (that long before ``now``) or an ISO 8601 / RFC 3339 time."""
    if _DURATIONS.fullmatch(text):
        seconds = sum(float(n) * _UNITS[unit] for n, unit in _DURATION.findall(text))
        return now - timedelta(seconds=seconds)
    try:
        moment = datetime.fromisoformat(text)
    except ValueError as err:
        raise ControlError(f"observe: {text!r} is neither a duration (10m) nor a time (RFC 3339)") from err
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _identity_filter(flt: flow_pb2.FlowFilter, side: str, identity: str) -> None:
    """A number is a numeric identity (the handle); anything else a SPIFFE ID pattern (``*`` allowed)."""
    if identity.isdigit():
        getattr(flt, f"{side}_identity").append(int(identity))
    else:
        getattr(flt, f"{side}_label").append(SPIFFE_LABEL + identity)


@dataclass(frozen=True, slots=True)
class Query:
    """The flags of ``authd observe``; every given criterion must hold."""

    follow: bool = False
    last: int | None = None
    first: int | None = None
    since: str | None = None
    until: str | None = None
    verdicts: Sequence[str] = ()
    direction: str | None = None
    from_ip: Sequence[str] = ()
    to_ip: Sequence[str] = ()
    ip: Sequence[str] = ()
    from_port: Sequence[str] = ()
    to_port: Sequence[str] = ()
    port: Sequence[str] = ()
    protocols: Sequence[str] = ()
    from_identity: Sequence[str] = ()
    to_identity: Sequence[str] = ()
    identity: Sequence[str] = ()
    node_names: Sequence[str] = ()
    blacklist: Sequence[flow_pb2.FlowFilter] = field(default=())

    def to_request(self, now: datetime) -> observer_pb2.GetFlowsRequest:
        """The GetFlows request; raise ControlError for contradictory or malformed flags."""
        if self.first is not None and (self.follow or self.last is not None):
            raise ControlError("observe: --first cannot go with --follow or --last")
        request = observer_pb2.GetFlowsRequest(follow=self.follow)
        if self.since:
            request.since.FromDatetime(parse_time(self.since, now))
        if self.until:
            request.until.FromDatetime(parse_time(self.until, now))
        if self.first is not None:
            request.number, request.first = self.first, True
        elif self.last is not None:
            request.number = self.last
        elif not (self.follow or self.since or self.until):
            request.number = DEFAULT_LAST
        filters = [self._one_sided()]
        for side_values, fill in (
            (self.ip, _append("ip")),
            (self.port, _append("port")),
            (self.identity, _identity_filter),
        ):
            if side_values:
                filters = [_with_side(flt, side, side_values, fill) for flt in filters for side in _SIDES]
        if filters != [flow_pb2.FlowFilter()]:
            request.whitelist.extend(filters)
        request.blacklist.extend(self.blacklist)
        return request

    def _one_sided(self) -> flow_pb2.FlowFilter:
        flt = flow_pb2.FlowFilter()
        try:
            flt.verdict.extend(VERDICTS[v.upper()] for v in self.verdicts)
            if self.direction:
                flt.traffic_direction.append(DIRECTIONS[self.direction.upper()])
        except KeyError as err:
            raise ControlError(f"observe: unknown verdict or direction {err}") from err
        flt.source_ip.extend(self.from_ip)
        flt.destination_ip.extend(self.to_ip)
        flt.source_port.extend(self.from_port)
        flt.destination_port.extend(self.to_port)
        flt.protocol.extend(p.lower() for p in self.protocols)
        flt.node_name.extend(self.node_names)
        for identity in self.from_identity:
            _identity_filter(flt, "source", identity)
        for identity in self.to_identity:
            _identity_filter(flt, "destination", identity)
        return flt


_SIDES = ("source", "destination")
Fill = Callable[[flow_pb2.FlowFilter, str, str], None]


def _append(kind: str) -> Fill:
    return lambda flt, side, value: getattr(flt, f"{side}_{kind}").append(value)


def _with_side(flt: flow_pb2.FlowFilter, side: str, values: Sequence[str], fill: Fill) -> flow_pb2.FlowFilter:
    copy = flow_pb2.FlowFilter()
    copy.CopyFrom(flt)
    for value in values:
        fill(copy, side, value)
    return copy


def target(address: str) -> str:
    """A gRPC target: a path is a Unix socket; ``unix:...`` and ``host:port`` are used as given."""
    return f"unix:{address}" if address.startswith("/") or ":" not in address else address


def _ask(address: str, request: observer_pb2.GetFlowsRequest) -> Iterator[observer_pb2.GetFlowsResponse]:
    with grpc.insecure_channel(target(address)) as channel:
        try:
            grpc.channel_ready_future(channel).result(timeout=CONNECT_TIMEOUT)
        except grpc.FutureTimeoutError as err:
            raise ControlError(
                f"observe: no Hubble observer at {address}: is authd running, with [hubble] enabled?",
                not_running=True,
            ) from err
        get_flows = channel.unary_stream(
            GET_FLOWS,
            request_serializer=observer_pb2.GetFlowsRequest.SerializeToString,
            response_deserializer=observer_pb2.GetFlowsResponse.FromString,
        )
        try:
            yield from get_flows(request, timeout=None if request.follow else SNAPSHOT_TIMEOUT)
        except grpc.RpcError as err:
            code, details = err.code(), err.details()
            if request.follow and code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
                return  # connected, then the daemon went away: the followed stream has ended
            if code is grpc.StatusCode.UNAVAILABLE:
                raise ControlError(
                    f"observe: no Hubble observer at {address}: is authd running, with [hubble] "
                    f"enabled? ({details})",
                    not_running=True,
                ) from err
            raise ControlError(f"observe: {address}: {code.name}: {details}") from err


def flows(
    sockets: Sequence[str], request: observer_pb2.GetFlowsRequest
) -> Iterator[observer_pb2.GetFlowsResponse]:
    """The answers of every node's socket: one node as it streams; several merged by time."""
    if len(sockets) == 1:
        yield from _ask(sockets[0], request)
        return
    answers: queue.Queue[observer_pb2.GetFlowsResponse | AuthdError | None] = queue.Queue(maxsize=4096)

    def pump(socket: str) -> None:
        try:
            for response in _ask(socket, request):
                answers.put(response)
        except AuthdError as err:
            answers.put(err)
        finally:
            answers.put(None)

    for socket in sockets:
        threading.Thread(target=pump, args=(socket,), daemon=True, name=f"observe {socket}").start()
    pending, kept = len(sockets), []
    while pending:
        answer = answers.get()
        if answer is None:
            pending -= 1
        elif isinstance(answer, AuthdError):
            raise answer
        elif request.follow:
            yield answer
        else:
            kept.append(answer)
    yield from sorted(kept, key=lambda r: r.time.ToNanoseconds())
