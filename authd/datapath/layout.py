"""The Python mirror of ``bpf/include/authd.h``: structs, enums, map names and constants.

Every class and constant here MUST MATCH the header; ``tests/unit/test_datapath_layout.py`` compares the
struct sizes and field offsets with the BTF of the compiled object, so a change on one side only fails the
test suite instead of corrupting maps at run time. Integers are host byte order, addresses network order.
"""

from __future__ import annotations

import ctypes
import enum
from typing import ClassVar

# ------------------------------------------------------------------------------------------ handles

IDENTITY_WORLD = 0  # must match AUTHD_IDENTITY_WORLD
IDENTITY_ANY = 0xFFFFFFFF  # must match AUTHD_IDENTITY_ANY
NODE_LOCAL = 0  # must match AUTHD_NODE_LOCAL
IPCACHE_FAMILY_BITS = 32  # must match AUTHD_IPCACHE_FAMILY_BITS


class AuthType(enum.IntEnum):
    """How a pair must be authenticated (enum authd_auth_type)."""

    NONE = 0
    SPIRE = 1
    KTLS = 2


class Direction(enum.IntEnum):
    """Traffic direction from the local endpoint's point of view (enum authd_direction)."""

    INGRESS = 1
    EGRESS = 2


class Family(enum.IntEnum):
    """Address family in ipcache keys and events (enum authd_family)."""

    IPV4 = 4
    IPV6 = 6


class FlowLevel(enum.IntEnum):
    """Which policy verdicts become flow events (enum authd_flow_level)."""

    NONE = 0
    DENIED = 1
    FIRST = 2
    ALL = 3


class Verdict(enum.IntEnum):
    """A packet's fate (enum authd_verdict)."""

    ALLOWED = 1
    DENIED = 2


class DropReason(enum.IntEnum):
    """Why a packet was dropped (enum authd_drop_reason)."""

    NONE = 0
    AUTH_REQUIRED = 1
    AUTH_EXPIRED = 2
    MALFORMED = 3
    SOURCE_NOT_OWNED = 4
    SOURCE_WRONG_INTERFACE = 5
    DESTINATION_NOT_OWNED = 6
    UNSUPPORTED = 7
    ROUTER_MESSAGE = 8
    ENCRYPTION_UNAVAILABLE = 9
    NOT_ENCRYPTED = 10


class PolicyMatch(enum.IntEnum):
    """What decided a verdict (enum authd_policy_match)."""

    NONE = 0
    EXEMPT = 1
    AUTH = 2


class Hook(enum.IntEnum):
    """The tc hook a program ran at (enum authd_hook)."""

    INGRESS = 1
    EGRESS = 2


class EventType(enum.IntEnum):
    """First u32 of every ring-buffer record (enum authd_event_type)."""

    AUTH_REQUIRED = 1
    FLOW = 2


class Counter(enum.IntEnum):
    """Index into the per-CPU counters map (enum authd_counter)."""

    ALLOWED = 0
    ALLOWED_AUTH = 1
    DENIED_AUTH_REQUIRED = 2
    DENIED_AUTH_EXPIRED = 3
    DENIED_MALFORMED = 4
    AUTH_EVENTS = 5
    AUTH_EVENTS_SUPPRESSED = 6
    FLOW_EVENTS = 7
    FLOW_EVENTS_LOST = 8
    NEIGHBOR = 9
    AUTH_EVENTS_LOST = 10
    DENIED_SOURCE_NOT_OWNED = 11
    DENIED_SOURCE_WRONG_INTERFACE = 12
    DENIED_DESTINATION_NOT_OWNED = 13
    DENIED_UNSUPPORTED = 14
    ESTABLISHED = 15
    DENIED_ROUTER_MESSAGE = 16
    DENIED_ENCRYPTION_UNAVAILABLE = 17
    DENIED_NOT_ENCRYPTED = 18


COUNTER_SLOTS = 32  # must match AUTHD_COUNTER_SLOTS
VERDICT_SLOTS = 64  # must match AUTHD_VERDICT_SLOTS: each counter once per direction

FLOW_F_PORTS = 0x1  # must match AUTHD_FLOW_F_PORTS
FLOW_F_FRAGMENT = 0x2  # must match AUTHD_FLOW_F_FRAGMENT
FLOW_F_ARP = 0x4  # must match AUTHD_FLOW_F_ARP
FLOW_F_REPLY = 0x8  # must match AUTHD_FLOW_F_REPLY
FLOW_F_ENCRYPTED = 0x10  # must match AUTHD_FLOW_F_ENCRYPTED
FLOW_V_TUNNELED = 0x1  # must match AUTHD_FLOW_V_TUNNELED
FLOW_RECHECK_NS = 500_000_000  # must match AUTHD_FLOW_RECHECK_NS
ARP_PROTOCOL = 0x0806  # the protocol Python gives a flow event with FLOW_F_ARP (its ethertype)

TC_HANDLE = 0xA17D  # must match AUTHD_TC_HANDLE
TC_PRIORITY = 1  # must match AUTHD_TC_PRIORITY

# ---------------------------------------------------------------------------------------------- maps


class MapName(enum.StrEnum):
    """Map names, which are also their pin names under the pin directory (AUTHD_MAP_*)."""

    IPCACHE = "ipcache"
    POLICY = "policy"
    AUTH = "auth"
    EVENTS = "events"
    COUNTERS = "counters"
    CONFIG = "config"
    AUTH_RATELIMIT = "auth_ratelimit"
    FLOWS = "flows"
    ENDPOINTS = "endpoints"
    AUTH_EVENTS = "auth_events"
    FRAGMENTS = "fragments"
    VERDICTS = "verdicts"


class ProgramName(enum.StrEnum):
    """Programs in the object: hook x interface kind (workload-facing Ethernet, node-facing bare L3)."""

    INGRESS = "authd_in"
    EGRESS = "authd_eg"
    INGRESS_L3 = "authd_in_l3"
    EGRESS_L3 = "authd_eg_l3"


class HeaderStruct(ctypes.Structure):
    """A header struct; ``c_name`` is its name in the header and the object's BTF."""

    c_name: ClassVar[str]


class IpcacheKey(HeaderStruct):
    """Must match struct authd_ipcache_key."""

    c_name = "authd_ipcache_key"
    _fields_: ClassVar = [
        ("prefixlen", ctypes.c_uint32),
        ("family", ctypes.c_uint32),
        ("addr", ctypes.c_uint8 * 16),
    ]


class IpcacheValue(HeaderStruct):
    """Must match struct authd_ipcache_value."""

    c_name = "authd_ipcache_value"
    _fields_: ClassVar = [
        ("identity", ctypes.c_uint32),
        ("node", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
    ]


class EndpointValue(HeaderStruct):
    """Must match struct authd_endpoint_value."""

    c_name = "authd_endpoint_value"
    _fields_: ClassVar = [
        ("ifindex", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
    ]


ENDPOINT_F_ROUTE = 0x1  # must match AUTHD_ENDPOINT_F_ROUTE
ENDPOINT_F_CNI = 0x2  # must match AUTHD_ENDPOINT_F_CNI


class PolicyKeyC(HeaderStruct):
    """Must match struct authd_policy_key."""

    c_name = "authd_policy_key"
    _fields_: ClassVar = [
        ("local", ctypes.c_uint32),
        ("remote", ctypes.c_uint32),
        ("direction", ctypes.c_uint8),
        ("pad", ctypes.c_uint8 * 3),
    ]


class PolicyValue(HeaderStruct):
    """Must match struct authd_policy_value."""

    c_name = "authd_policy_value"
    _fields_: ClassVar = [
        ("auth_type", ctypes.c_uint8),
        ("pad", ctypes.c_uint8 * 3),
    ]


class AuthKeyC(HeaderStruct):
    """Must match struct authd_auth_key."""

    c_name = "authd_auth_key"
    _fields_: ClassVar = [
        ("local", ctypes.c_uint32),
        ("remote", ctypes.c_uint32),
        ("remote_node", ctypes.c_uint32),
        ("auth_type", ctypes.c_uint8),
        ("pad", ctypes.c_uint8 * 3),
    ]


class AuthValue(HeaderStruct):
    """Must match struct authd_auth_value."""

    c_name = "authd_auth_value"
    _fields_: ClassVar = [("expires_tai_ns", ctypes.c_uint64)]


class ConfigValue(HeaderStruct):
    """Must match struct authd_config."""

    c_name = "authd_config"
    _fields_: ClassVar = [
        ("flow_level", ctypes.c_uint32),
        ("tunnel_ifindex", ctypes.c_uint32),
        ("auth_required_interval_ns", ctypes.c_uint64),
    ]


class FlowKey(HeaderStruct):
    """Must match struct authd_flow_key."""

    c_name = "authd_flow_key"
    _fields_: ClassVar = [
        ("family", ctypes.c_uint8),
        ("protocol", ctypes.c_uint8),
        ("local_port", ctypes.c_uint16),
        ("remote_port", ctypes.c_uint16),
        ("pad", ctypes.c_uint16),
        ("local_addr", ctypes.c_uint8 * 16),
        ("remote_addr", ctypes.c_uint8 * 16),
    ]


class FlowValue(HeaderStruct):
    """Must match struct authd_flow_value."""

    c_name = "authd_flow_value"
    _fields_: ClassVar = [
        ("recheck_ns", ctypes.c_uint64),
        ("local", ctypes.c_uint32),
        ("remote", ctypes.c_uint32),
        ("remote_node", ctypes.c_uint32),
        ("local_ifindex", ctypes.c_uint32),
        ("remote_ifindex", ctypes.c_uint32),
        ("origin", ctypes.c_uint8),
        ("verdict", ctypes.c_uint8),
        ("drop_reason", ctypes.c_uint8),
        ("auth_type", ctypes.c_uint8),
        ("match", ctypes.c_uint8),
        ("flags", ctypes.c_uint8),
        ("pad", ctypes.c_uint8 * 2),
    ]


class AuthEventC(HeaderStruct):
    """Must match struct authd_auth_event."""

    c_name = "authd_auth_event"
    _fields_: ClassVar = [
        ("type", ctypes.c_uint32),
        ("ifindex", ctypes.c_uint32),
        ("timestamp_tai_ns", ctypes.c_uint64),
        ("key", AuthKeyC),
        ("direction", ctypes.c_uint8),
        ("drop_reason", ctypes.c_uint8),
        ("family", ctypes.c_uint8),
        ("protocol", ctypes.c_uint8),
        ("pad", ctypes.c_uint32),
        ("src_addr", ctypes.c_uint8 * 16),
        ("dst_addr", ctypes.c_uint8 * 16),
    ]


class FlowEventC(HeaderStruct):
    """Must match struct authd_flow_event."""

    c_name = "authd_flow_event"
    _fields_: ClassVar = [
        ("type", ctypes.c_uint32),
        ("ifindex", ctypes.c_uint32),
        ("timestamp_tai_ns", ctypes.c_uint64),
        ("local_identity", ctypes.c_uint32),
        ("remote_identity", ctypes.c_uint32),
        ("remote_node", ctypes.c_uint32),
        ("verdict", ctypes.c_uint8),
        ("direction", ctypes.c_uint8),
        ("auth_type", ctypes.c_uint8),
        ("drop_reason", ctypes.c_uint8),
        ("family", ctypes.c_uint8),
        ("protocol", ctypes.c_uint8),
        ("tcp_flags", ctypes.c_uint8),
        ("hook", ctypes.c_uint8),
        ("match", ctypes.c_uint8),
        ("flags", ctypes.c_uint8),
        ("src_port", ctypes.c_uint16),
        ("dst_port", ctypes.c_uint16),
        ("pad", ctypes.c_uint16),
        ("src_addr", ctypes.c_uint8 * 16),
        ("dst_addr", ctypes.c_uint8 * 16),
        ("pad2", ctypes.c_uint32),
    ]


STRUCTS: tuple[type[HeaderStruct], ...] = (
    IpcacheKey,
    IpcacheValue,
    EndpointValue,
    PolicyKeyC,
    PolicyValue,
    AuthKeyC,
    AuthValue,
    ConfigValue,
    FlowKey,
    FlowValue,
    AuthEventC,
    FlowEventC,
)
"""Every mirrored struct, for the layout test."""

ENUMS: tuple[tuple[type[enum.IntEnum], str], ...] = (
    (AuthType, "AUTHD_AUTH_"),
    (Direction, "AUTHD_DIR_"),
    (Family, "AUTHD_FAMILY_"),
    (FlowLevel, "AUTHD_FLOWS_"),
    (Verdict, "AUTHD_VERDICT_"),
    (DropReason, "AUTHD_DROP_"),
    (PolicyMatch, "AUTHD_MATCH_"),
    (Hook, "AUTHD_HOOK_"),
    (EventType, "AUTHD_EVENT_"),
    (Counter, "AUTHD_CNT_"),
)
"""Every mirrored enum with its C prefix, for the layout test."""
