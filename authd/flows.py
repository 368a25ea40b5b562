"""Flow events for ``authd observe``: recent history, followers, filters, JSON and Hubble-style lines.

The daemon resolves identity handles to SPIFFE IDs when an event arrives (a handle may be reused later),
keeps the last few thousand records, and fans new ones out to followers through bounded queues: a slow
follower loses records, counted and reported to it, and never slows the ring-buffer consumer. The CLI
renders the JSON form; a line reads like Hubble's (here wrapped)::

    Nov 22 13:54:13.518: 10.0.1.5:44494 (spiffe://td/ns/app/sa/web) -> 10.0.2.7:80
    (spiffe://td/ns/app/sa/db) policy-verdict:auth INGRESS ALLOWED (TCP Flags: SYN; Auth: SPIRE)
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncGenerator, Iterator
from dataclasses import dataclass
from datetime import datetime, tzinfo
from ipaddress import ip_address
from typing import Any, Protocol

from authd.datapath.events import FlowEvent
from authd.datapath.layout import ARP_PROTOCOL, AuthType, Direction, DropReason, PolicyMatch, Verdict
from authd.errors import ControlError

RING_CAPACITY = 4096
FOLLOWER_QUEUE = 1024
MAX_FOLLOWERS = 16

TCP_FLAG_NAMES = (
    (0x01, "FIN"),
    (0x02, "SYN"),
    (0x04, "RST"),
    (0x08, "PSH"),
    (0x10, "ACK"),
    (0x20, "URG"),
    (0x40, "ECE"),
    (0x80, "CWR"),
)
PROTOCOL_NAMES = {
    1: "ICMPv4",
    6: "TCP",
    17: "UDP",
    58: "ICMPv6",
    132: "SCTP",
    136: "UDPLite",
    ARP_PROTOCOL: "ARP",
}
DROP_REASON_TEXT = {
    DropReason.AUTH_REQUIRED: "Authentication required",
    DropReason.AUTH_EXPIRED: "Authentication expired",
    DropReason.MALFORMED: "Malformed packet",
    DropReason.SOURCE_NOT_OWNED: "Source address not owned by the interface",
    DropReason.SOURCE_WRONG_INTERFACE: "Local endpoint's source address from another interface",
    DropReason.DESTINATION_NOT_OWNED: "Destination address not owned by the interface",
    DropReason.UNSUPPORTED: "Unsupported protocol",
}
MATCH_TEXT = {PolicyMatch.NONE: "none", PolicyMatch.EXEMPT: "exempt", PolicyMatch.AUTH: "auth"}


class IdentityNames(Protocol):
    """Names for handles; implemented by the cluster state's handle registry."""

    def identity_name(self, handle: int) -> str | None:
        """The SPIFFE ID of an identity handle, if known."""
        ...

    def node_name(self, handle: int) -> str | None:
        """The name of a node handle, if known."""
        ...


class NoNames:
    """Knows no names: flows show handle numbers (until cluster state provides names)."""

    def identity_name(self, handle: int) -> str | None:
        """Always unknown."""
        del handle
        return None

    def node_name(self, handle: int) -> str | None:
        """Always unknown."""
        del handle
        return None


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One end of a flow as shown: address, port, identity handle and its name."""

    ip: str
    port: int | None
    identity: int
    name: str | None


@dataclass(frozen=True, slots=True)
class Flow:
    """A flow as observe shows it; built from an event in the daemon, or from JSON in the CLI."""

    time: datetime
    verdict: str
    direction: str
    drop_reason: str | None
    match: str
    auth_type: str
    source: Endpoint
    destination: Endpoint
    remote_node: int
    remote_node_name: str | None
    protocol: int
    tcp_flags: tuple[str, ...]
    fragment: bool
    ifindex: int

    @classmethod
    def from_event(cls, event: FlowEvent, names: IdentityNames) -> Flow:
        """Resolve an event's handles to names now."""

        def endpoint(ip: object, port: int | None, handle: int) -> Endpoint:
            return Endpoint(str(ip), port, handle, names.identity_name(handle))

        return cls(
            time=event.timestamp,
            verdict=event.verdict.name,
            direction=event.direction.name,
            drop_reason=event.drop_reason.name if event.drop_reason is not DropReason.NONE else None,
            match=MATCH_TEXT[event.match],
            auth_type=event.auth_type.name,
            source=endpoint(event.src, event.src_port, event.src_identity),
            destination=endpoint(event.dst, event.dst_port, event.dst_identity),
            remote_node=event.remote_node,
            remote_node_name=names.node_name(event.remote_node),
            protocol=event.protocol,
            tcp_flags=tuple(name for bit, name in TCP_FLAG_NAMES if event.tcp_flags & bit)
            if event.protocol == 6
            else (),
            fragment=event.fragment,
            ifindex=event.ifindex,
        )

    def to_json(self) -> dict[str, Any]:
        """The JSON object ``authd observe --json`` prints, one per line."""

        def endpoint(e: Endpoint) -> dict[str, Any]:
            return {"ip": e.ip, "port": e.port, "identity": e.identity, "spiffe_id": e.name}

        return {
            "time": self.time.isoformat(),
            "verdict": self.verdict,
            "direction": self.direction,
            "drop_reason": self.drop_reason,
            "policy_match": self.match,
            "auth_type": self.auth_type,
            "source": endpoint(self.source),
            "destination": endpoint(self.destination),
            "remote_node": {"handle": self.remote_node, "name": self.remote_node_name},
            "protocol": self.protocol,
            "tcp_flags": list(self.tcp_flags),
            "fragment": self.fragment,
            "ifindex": self.ifindex,
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Flow:
        """Parse what :meth:`to_json` produced; raise ControlError on anything else."""
        try:

            def endpoint(e: dict[str, Any]) -> Endpoint:
                port = e["port"]
                return Endpoint(
                    str(e["ip"]), None if port is None else int(port), int(e["identity"]), e["spiffe_id"]
                )

            return cls(
                time=datetime.fromisoformat(obj["time"]),
                verdict=str(obj["verdict"]),
                direction=str(obj["direction"]),
                drop_reason=obj["drop_reason"],
                match=str(obj["policy_match"]),
                auth_type=str(obj["auth_type"]),
                source=endpoint(obj["source"]),
                destination=endpoint(obj["destination"]),
                remote_node=int(obj["remote_node"]["handle"]),
                remote_node_name=obj["remote_node"]["name"],
                protocol=int(obj["protocol"]),
                tcp_flags=tuple(str(f) for f in obj["tcp_flags"]),
                fragment=bool(obj["fragment"]),
                ifindex=int(obj["ifindex"]),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise ControlError(f"control: malformed flow from the daemon: {err!r}") from err


def _address(e: Endpoint) -> str:
    if e.port is None:
        return e.ip
    return f"[{e.ip}]:{e.port}" if ip_address(e.ip).version == 6 else f"{e.ip}:{e.port}"


def _identity(e: Endpoint) -> str:
    if e.name:
        return e.name
    return "world" if e.identity == 0 else str(e.identity)


def render(flow: Flow, tz: tzinfo | None = None) -> str:
    """One Hubble-style line; times in ``tz`` (default: the local time zone)."""
    t = flow.time.astimezone(tz)
    stamp = f"{t:%b} {t.day:2d} {t:%H:%M:%S}.{t.microsecond // 1000:03d}"
    details: list[str] = []
    if flow.protocol == 6:
        if flow.tcp_flags:
            details.append("TCP Flags: " + ", ".join(flow.tcp_flags))
    else:
        details.append(PROTOCOL_NAMES.get(flow.protocol, f"protocol {flow.protocol}"))
    if flow.auth_type != AuthType.NONE.name:
        details.append(f"Auth: {flow.auth_type}")
    if flow.drop_reason:
        reason = DROP_REASON_TEXT.get(DropReason[flow.drop_reason], flow.drop_reason)
        details.append(f"Drop reason: {reason}")
    suffix = f" ({'; '.join(details)})" if details else ""
    return (
        f"{stamp}: {_address(flow.source)} ({_identity(flow.source)}) -> "
        f"{_address(flow.destination)} ({_identity(flow.destination)}) "
        f"policy-verdict:{flow.match} {flow.direction} {flow.verdict}{suffix}"
    )


@dataclass(frozen=True, slots=True)
class FlowFilter:
    """Which flows a client wants: every given criterion must hold."""

    identity: str | None = None
    verdict: Verdict | None = None
    direction: Direction | None = None

    def __call__(self, flow: Flow) -> bool:
        """Whether ``flow`` passes."""
        if self.verdict is not None and flow.verdict != self.verdict.name:
            return False
        if self.direction is not None and flow.direction != self.direction.name:
            return False
        if self.identity is not None:
            ends = (flow.source, flow.destination)
            return any(self.identity in (e.name, str(e.identity)) for e in ends)
        return True

    def to_request(self) -> dict[str, Any]:
        """The filter's fields in a control request."""
        return {
            "identity": self.identity,
            "verdict": self.verdict.name.lower() if self.verdict else None,
            "direction": self.direction.name.lower() if self.direction else None,
        }

    @classmethod
    def from_request(cls, request: dict[str, Any]) -> FlowFilter:
        """Read a filter from a control request; raise ControlError naming a bad field."""
        identity = request.get("identity")
        if identity is not None and not isinstance(identity, str):
            raise ControlError("control: identity must be a string")
        try:
            verdict = request.get("verdict")
            direction = request.get("direction")
            return cls(
                identity=identity,
                verdict=Verdict[verdict.upper()] if verdict else None,
                direction=Direction[direction.upper()] if direction else None,
            )
        except (KeyError, AttributeError) as err:
            raise ControlError(f"control: bad filter value {err}") from err


class Follower:
    """A client following new flows through a bounded queue."""

    def __init__(self, flt: FlowFilter, capacity: int) -> None:
        """Follow flows that pass ``flt``."""
        self.filter = flt
        self._queue: asyncio.Queue[Flow] = asyncio.Queue(maxsize=capacity)
        self.lost = 0

    def offer(self, flow: Flow) -> None:
        """Queue a flow without waiting; count it as lost when the queue is full."""
        if not self.filter(flow):
            return
        try:
            self._queue.put_nowait(flow)
        except asyncio.QueueFull:
            self.lost += 1

    async def next(self) -> tuple[Flow, int]:
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
    ) -> None:
        """Keep ``capacity`` flows; each follower may lag ``follower_queue`` flows before losing any."""
        self._names = names
        self._ring: collections.deque[Flow] = collections.deque(maxlen=capacity)
        self._follower_queue = follower_queue
        self._max_followers = max_followers
        self._followers: set[Follower] = set()
        self.total = 0

    def add(self, event: FlowEvent) -> None:
        """Record an event and hand it to every follower (never blocks)."""
        flow = Flow.from_event(event, self._names)
        self._ring.append(flow)
        self.total += 1
        for follower in self._followers:
            follower.offer(flow)

    def last(self, count: int, flt: FlowFilter) -> list[Flow]:
        """The newest ``count`` flows passing ``flt``, oldest first."""
        if count <= 0:
            return []
        picked: list[Flow] = []
        for flow in reversed(self._ring):
            if flt(flow):
                picked.append(flow)
                if len(picked) == count:
                    break
        picked.reverse()
        return picked

    def follow(self, flt: FlowFilter) -> Follower:
        """Start following; call :meth:`unfollow` when done."""
        if len(self._followers) >= self._max_followers:
            raise ControlError(f"control: too many followers (at most {self._max_followers})")
        follower = Follower(flt, self._follower_queue)
        self._followers.add(follower)
        return follower

    def unfollow(self, follower: Follower) -> None:
        """Stop handing flows to ``follower``."""
        self._followers.discard(follower)

    def __iter__(self) -> Iterator[Flow]:
        """The kept flows, oldest first."""
        return iter(self._ring)


DEFAULT_LAST = 20
MAX_LAST = RING_CAPACITY


async def serve_observe(flow_log: FlowLog, request: dict[str, Any]) -> AsyncGenerator[dict[str, Any], None]:
    """The ``observe`` control op: the last N matching flows, then (``follow``) new ones as they come.

    Request fields: ``last`` (int), ``follow`` (bool) and the :class:`FlowFilter` fields. A follower that
    fell behind gets ``{"lost": n}`` before the next flow.
    """
    flt = FlowFilter.from_request(request)
    follow = bool(request.get("follow", False))
    last = request.get("last")
    if last is None:
        last = 0 if follow else DEFAULT_LAST
    if not isinstance(last, int) or isinstance(last, bool) or not 0 <= last <= MAX_LAST:
        raise ControlError(f"control: last must be an integer from 0 to {MAX_LAST}")
    # Subscribe before replaying history so nothing falls between the two.
    follower = flow_log.follow(flt) if follow else None
    try:
        for flow in flow_log.last(last, flt):
            yield flow.to_json()
        while follower is not None:
            flow, lost = await follower.next()
            if lost:
                yield {"lost": lost}
            yield flow.to_json()
    finally:
        if follower is not None:
            flow_log.unfollow(follower)
