"""A datapath flow event as Hubble's ``flow.Flow``.

Handles are resolved to names when the event arrives (a handle may be reused later). An allowed packet
is a policy-verdict event (``FORWARDED``); a dropped one is a drop event (``DROPPED``, with
``drop_reason_desc``), as Cilium reports them. SPIFFE IDs go where Hubble clients show identity labels:
``spiffe:id=<SPIFFE ID>`` in the endpoint's labels; the numeric identity is authd's node-local handle,
with the world as Cilium's reserved identity 2. The remote end's node is the label ``authd:node=<name>``,
absent when the remote address is unknown (the world has no node). ``IP.encrypted`` says the datapath
saw the packet on authd's WireGuard tunnel (it entered the node through it, or leaves through it).
"""

from __future__ import annotations

import uuid
from ipaddress import IPv4Address
from typing import Protocol

from google.protobuf.timestamp_pb2 import Timestamp
from google.protobuf.wrappers_pb2 import BoolValue

from authd.datapath.events import FlowEvent
from authd.datapath.layout import AuthType, Direction, DropReason, Verdict
from authd.hubble._proto import flow_pb2
from authd.hubble.reasons import (
    DROP_REASONS,
    IDENTITY_WORLD,
    MESSAGE_TYPE_DROP,
    MESSAGE_TYPE_POLICY_VERDICT,
    POLICY_MATCH,
)

WORLD_HANDLE = 0
LOCAL_NODE = 0
SPIFFE_LABEL = "spiffe:id="
NODE_LABEL = "authd:node="

TCP, UDP, SCTP, ICMPV4, ICMPV6 = 6, 17, 132, 1, 58
PROTOCOL_NAMES = {ICMPV4: "ICMPv4", TCP: "TCP", UDP: "UDP", ICMPV6: "ICMPv6", SCTP: "SCTP", 136: "UDPLite"}
TCP_FLAG_BITS = (
    (0x01, "FIN"),
    (0x02, "SYN"),
    (0x04, "RST"),
    (0x08, "PSH"),
    (0x10, "ACK"),
    (0x20, "URG"),
    (0x40, "ECE"),
    (0x80, "CWR"),
)


class IdentityNames(Protocol):
    """Names for handles; implemented by the cluster state's handle registry."""

    def identity_name(self, handle: int) -> str | None:
        """The SPIFFE ID of an identity handle, if known."""
        ...

    def node_name(self, handle: int) -> str | None:
        """The name of a node handle (this node's for 0), if known."""
        ...


def flow_from_event(event: FlowEvent, names: IdentityNames) -> flow_pb2.Flow:
    """The Hubble flow for ``event``, observed on this node (``names.node_name(0)``)."""
    node = names.node_name(LOCAL_NODE) or ""
    remote_node = None if event.remote_identity == WORLD_HANDLE else names.node_name(event.remote_node)
    local = _endpoint(event.local_identity, names, node)
    remote = _endpoint(event.remote_identity, names, remote_node)
    source, destination = (local, remote) if event.direction is Direction.EGRESS else (remote, local)
    time = Timestamp()
    time.FromDatetime(event.timestamp)
    flow = flow_pb2.Flow(
        time=time,
        uuid=str(uuid.uuid4()),
        auth_type=flow_pb2.SPIRE if event.auth_type in (AuthType.SPIRE, AuthType.KTLS) else flow_pb2.DISABLED,
        IP=flow_pb2.IP(
            source=str(event.src),
            destination=str(event.dst),
            ipVersion=flow_pb2.IPv4 if isinstance(event.src, IPv4Address) else flow_pb2.IPv6,
            encrypted=event.encrypted,
        ),
        source=source,
        destination=destination,
        Type=flow_pb2.L3_L4,
        node_name=node,
        traffic_direction=flow_pb2.INGRESS if event.direction is Direction.INGRESS else flow_pb2.EGRESS,
        policy_match_type=POLICY_MATCH[event.match],
        interface=flow_pb2.NetworkInterface(index=event.ifindex),
        Summary=_summary(event),
    )
    _layer4(flow, event)
    reply = _is_reply(event)
    if reply is not None:
        flow.is_reply.CopyFrom(BoolValue(value=reply))
        flow.reply = reply
    if event.verdict is Verdict.DENIED and event.drop_reason is not DropReason.NONE:
        drop = DROP_REASONS[event.drop_reason.name]
        flow.verdict = flow_pb2.DROPPED
        flow.drop_reason = drop.reason
        flow.drop_reason_desc = drop.reason
        flow.event_type.CopyFrom(flow_pb2.CiliumEventType(type=MESSAGE_TYPE_DROP, sub_type=drop.reason))
    else:
        flow.verdict = flow_pb2.FORWARDED if event.verdict is Verdict.ALLOWED else flow_pb2.DROPPED
        flow.event_type.CopyFrom(flow_pb2.CiliumEventType(type=MESSAGE_TYPE_POLICY_VERDICT))
    return flow


def _endpoint(handle: int, names: IdentityNames, node: str | None) -> flow_pb2.Endpoint:
    if handle == WORLD_HANDLE:
        return flow_pb2.Endpoint(identity=IDENTITY_WORLD, labels=["reserved:world"])
    labels = []
    name = names.identity_name(handle)
    if name is not None:
        labels.append(SPIFFE_LABEL + name)
    if node:
        labels.append(NODE_LABEL + node)
    return flow_pb2.Endpoint(identity=handle, labels=labels)


def _layer4(flow: flow_pb2.Flow, event: FlowEvent) -> None:
    """Ports and TCP flags; ICMP carries no type or code in the event, so it gets no layer 4 message."""
    sport, dport = event.src_port or 0, event.dst_port or 0
    if event.protocol == TCP:
        flags = {name: True for bit, name in TCP_FLAG_BITS if event.tcp_flags & bit}
        flow.l4.TCP.CopyFrom(
            flow_pb2.TCP(source_port=sport, destination_port=dport, flags=flow_pb2.TCPFlags(**flags))
        )
    elif event.protocol == UDP:
        flow.l4.UDP.CopyFrom(flow_pb2.UDP(source_port=sport, destination_port=dport))
    elif event.protocol == SCTP:
        flow.l4.SCTP.CopyFrom(flow_pb2.SCTP(source_port=sport, destination_port=dport))


def _is_reply(event: FlowEvent) -> bool | None:
    """Known only for a TCP SYN: with ACK it answers a SYN. Without connection tracking, else unknown."""
    if event.protocol == TCP and event.tcp_flags & 0x02:
        return bool(event.tcp_flags & 0x10)
    return None


def _summary(event: FlowEvent) -> str:
    """Hubble's summary: ``TCP Flags: SYN, ACK`` for TCP, the protocol's name otherwise."""
    if event.protocol == TCP:
        flags = [name for bit, name in TCP_FLAG_BITS if event.tcp_flags & bit]
        return "TCP Flags: " + ", ".join(flags) if flags else "TCP"
    return PROTOCOL_NAMES.get(event.protocol, f"IP protocol {event.protocol}")
