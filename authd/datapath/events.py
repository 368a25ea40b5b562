"""Ring-buffer records decoded into frozen dataclasses: auth-required events and flow (policy-verdict) events.

Decoding is on the hot path of the event consumer, so it uses precompiled ``struct`` formats (checked
against the ctypes mirror by the layout test) and dict lookups instead of enum constructors.
"""

from __future__ import annotations

import functools
import struct
from dataclasses import dataclass
from datetime import datetime
from ipaddress import IPv4Address, IPv6Address

from authd.datapath import clock, layout
from authd.datapath.layout import (
    AuthType,
    Direction,
    DropReason,
    EventType,
    Family,
    Hook,
    PolicyMatch,
    Verdict,
)
from authd.datapath.maps import AuthKey

# struct authd_auth_event
AUTH_EVENT = struct.Struct("=IIQIIIB3xBBBB4x16s16s")
# struct authd_flow_event
FLOW_EVENT = struct.Struct("=IIQIIIBBBBBBBBBBHH2x16s16s4x")

_TYPE = struct.Struct("=I")

Address = IPv4Address | IPv6Address

_DIRECTIONS = {d.value: d for d in Direction}
_AUTH_TYPES = {a.value: a for a in AuthType}
_REASONS = {r.value: r for r in DropReason}
_VERDICTS = {v.value: v for v in Verdict}
_MATCHES = {m.value: m for m in PolicyMatch}
_HOOKS = {h.value: h for h in Hook}


class DecodeError(ValueError):
    """A ring-buffer record that does not match the contract (counted and skipped by the consumer)."""


@dataclass(frozen=True, slots=True)
class AuthRequiredEvent:
    """A packet was dropped for want of a live auth entry (sent at most once per key per interval)."""

    key: AuthKey
    direction: Direction
    reason: DropReason
    src: Address
    dst: Address
    protocol: int
    ifindex: int
    timestamp: datetime


@dataclass(frozen=True, slots=True)
class FlowEvent:
    """A policy verdict on a packet, seen from its local endpoint."""

    timestamp: datetime
    verdict: Verdict
    direction: Direction
    drop_reason: DropReason
    match: PolicyMatch
    auth_type: AuthType
    local_identity: int
    remote_identity: int
    remote_node: int
    src: Address
    dst: Address
    protocol: int
    src_port: int | None
    dst_port: int | None
    tcp_flags: int
    fragment: bool
    hook: Hook
    ifindex: int
    reply: bool = False
    """Judged by its flow's origin: a reply, or an ICMP error about the flow."""
    encrypted: bool = False
    """Seen on authd's WireGuard tunnel: it entered the node through it, or leaves through it."""

    @property
    def src_identity(self) -> int:
        """The source's identity handle (local for EGRESS, remote for INGRESS)."""
        return self.local_identity if self.direction is Direction.EGRESS else self.remote_identity

    @property
    def dst_identity(self) -> int:
        """The destination's identity handle."""
        return self.remote_identity if self.direction is Direction.EGRESS else self.local_identity


Event = AuthRequiredEvent | FlowEvent


@functools.lru_cache(maxsize=4096)
def _address(family: int, raw: bytes) -> Address:
    """Addresses repeat across events; the cache spares building the same objects again."""
    if family == Family.IPV4:
        return IPv4Address(raw[:4])
    if family == Family.IPV6:
        return IPv6Address(raw)
    raise DecodeError(f"unknown address family {family}")


def decode(record: bytes, tai_offset_ns: int) -> Event:
    """Decode one record; raise DecodeError for one that breaks the contract."""
    if len(record) < _TYPE.size:
        raise DecodeError(f"record of {len(record)} bytes")
    (kind,) = _TYPE.unpack_from(record)
    if kind == EventType.FLOW:
        return _decode_flow(record, tai_offset_ns)
    if kind == EventType.AUTH_REQUIRED:
        return _decode_auth(record, tai_offset_ns)
    raise DecodeError(f"unknown event type {kind}")


def _decode_auth(record: bytes, offset: int) -> AuthRequiredEvent:
    if len(record) < AUTH_EVENT.size:
        raise DecodeError(f"auth-required record of {len(record)} bytes, expected {AUTH_EVENT.size}")
    (_, ifindex, ts, local, remote, node, auth_type, direction, reason, family, protocol, src, dst) = (
        AUTH_EVENT.unpack_from(record)
    )
    try:
        return AuthRequiredEvent(
            key=AuthKey(local, remote, node, _AUTH_TYPES[auth_type]),
            direction=_DIRECTIONS[direction],
            reason=_REASONS[reason],
            src=_address(family, src),
            dst=_address(family, dst),
            protocol=protocol,
            ifindex=ifindex,
            timestamp=clock.from_tai_ns(ts, offset),
        )
    except KeyError as err:
        raise DecodeError(f"auth-required record with an unknown value {err}") from None


def _decode_flow(record: bytes, offset: int) -> FlowEvent:
    if len(record) < FLOW_EVENT.size:
        raise DecodeError(f"flow record of {len(record)} bytes, expected {FLOW_EVENT.size}")
    (
        _,
        ifindex,
        ts,
        local,
        remote,
        node,
        verdict,
        direction,
        auth_type,
        reason,
        family,
        protocol,
        tcp_flags,
        hook,
        match,
        flags,
        sport,
        dport,
        src,
        dst,
    ) = FLOW_EVENT.unpack_from(record)
    ports = flags & layout.FLOW_F_PORTS
    try:
        return FlowEvent(
            timestamp=clock.from_tai_ns(ts, offset),
            verdict=_VERDICTS[verdict],
            direction=_DIRECTIONS[direction],
            drop_reason=_REASONS[reason],
            match=_MATCHES[match],
            auth_type=_AUTH_TYPES[auth_type],
            local_identity=local,
            remote_identity=remote,
            remote_node=node,
            src=_address(family, src),
            dst=_address(family, dst),
            protocol=layout.ARP_PROTOCOL if flags & layout.FLOW_F_ARP else protocol,
            src_port=sport if ports else None,
            dst_port=dport if ports else None,
            tcp_flags=tcp_flags,
            fragment=bool(flags & layout.FLOW_F_FRAGMENT),
            hook=_HOOKS[hook],
            ifindex=ifindex,
            reply=bool(flags & layout.FLOW_F_REPLY),
            encrypted=bool(flags & layout.FLOW_F_ENCRYPTED),
        )
    except KeyError as err:
        raise DecodeError(f"flow record with an unknown value {err}") from None
