"""``hubble observe``'s output modes for ``observer.GetFlowsResponse`` messages.

``compact`` (the default) writes one line per flow as Hubble's compact printer does::

    Nov 22 13:54:13.518 [node-b]: 10.0.1.5:44494 (ID:spiffe://td/ns/app/sa/web) -> 10.0.2.7:80
    (ID:spiffe://td/ns/app/sa/db) policy-verdict:L3-Only INGRESS ALLOWED (TCP Flags: SYN; Auth: SPIRE)

(here wrapped; the node only with ``--print-node-name``), ending ``...; Encrypted: WireGuard)`` for a
packet seen on authd's tunnel. SPIFFE IDs stand where Hubble prints numeric
identities; a handle without a name is ``(ID:<handle>)``, reserved identities print as ``(world)``. A
drop's type is its reason (``Authentication required DROPPED``), a reply's arrow ``<-`` with the ends
swapped, and ``<>`` when whether it is a reply is unknown. ``dict`` is Hubble's block form, ``json`` and
``jsonpb`` one ``GetFlowsResponse`` per line with Hubble's field names.
"""

from __future__ import annotations

from datetime import UTC, tzinfo
from ipaddress import ip_address
from typing import Literal

from google.protobuf import json_format

from authd.hubble._proto import flow_pb2, observer_pb2
from authd.hubble.convert import SPIFFE_LABEL
from authd.hubble.reasons import (
    DROP_TEXT,
    FIRST_NUMBERED_IDENTITY,
    MESSAGE_TYPE_DROP,
    MESSAGE_TYPE_POLICY_VERDICT,
    POLICY_MATCH_TEXT,
    RESERVED_IDENTITY_TEXT,
)

Output = Literal["compact", "dict", "json", "jsonpb"]
OUTPUTS: tuple[Output, ...] = ("compact", "dict", "json", "jsonpb")
DICT_SEPARATOR = "------------"


def to_json(response: observer_pb2.GetFlowsResponse) -> str:
    """One line of JSON with Hubble's field names (``{"flow": {...}, "node_name": ...}``)."""
    return json_format.MessageToJson(response, preserving_proto_field_name=True, indent=None)


def from_json(line: str | bytes) -> observer_pb2.GetFlowsResponse:
    """Parse a line :func:`to_json` wrote, strictly (unknown fields are an error)."""
    return json_format.Parse(line, observer_pb2.GetFlowsResponse())


def timestamp(flow: flow_pb2.Flow, tz: tzinfo | None) -> str:
    """Go's ``time.StampMilli`` (``Jan _2 15:04:05.000``) in ``tz`` (None: the local zone)."""
    if not flow.HasField("time"):
        return "N/A"
    t = flow.time.ToDatetime(tzinfo=UTC).astimezone(tz)
    return f"{t:%b} {t.day:2d} {t:%H:%M:%S}.{t.microsecond // 1000:03d}"


def _ports(flow: flow_pb2.Flow) -> tuple[str, str]:
    kind = flow.l4.WhichOneof("protocol")
    if kind in ("TCP", "UDP", "SCTP"):
        l4 = getattr(flow.l4, kind)
        return str(l4.source_port), str(l4.destination_port)
    return "", ""


def _host(ip: str, port: str, endpoint: flow_pb2.Endpoint) -> str:
    name = f"{endpoint.namespace}/{endpoint.pod_name}" if endpoint.pod_name else ip
    if not port:
        return name
    return f"[{name}]:{port}" if not endpoint.pod_name and ip_address(ip).version == 6 else f"{name}:{port}"


def hosts(flow: flow_pb2.Flow) -> tuple[str, str]:
    """Source and destination as Hubble prints them: ``ip:port``, ``[ip6]:port`` or ``ns/pod:port``."""
    if not flow.HasField("IP"):
        return "", ""
    sport, dport = _ports(flow)
    return _host(flow.IP.source, sport, flow.source), _host(flow.IP.destination, dport, flow.destination)


def identity(endpoint: flow_pb2.Endpoint) -> str:
    """``(ID:<SPIFFE ID>)``, ``(ID:<number>)`` without a name, ``(world)`` for reserved identities."""
    for label in endpoint.labels:
        if label.startswith(SPIFFE_LABEL):
            return f"(ID:{label.removeprefix(SPIFFE_LABEL)})"
    if endpoint.identity < FIRST_NUMBERED_IDENTITY:
        return f"({RESERVED_IDENTITY_TEXT.get(endpoint.identity, f'reserved:{endpoint.identity}')})"
    return f"(ID:{endpoint.identity})"


def flow_type(flow: flow_pb2.Flow) -> str:
    """``policy-verdict:<match> <DIRECTION>`` for a policy verdict, the drop reason's text for a drop."""
    kind = flow.event_type.type
    if kind == MESSAGE_TYPE_POLICY_VERDICT:
        match = POLICY_MATCH_TEXT.get(flow.policy_match_type, "none")
        return f"policy-verdict:{match} {flow_pb2.TrafficDirection.Name(flow.traffic_direction)}"
    if kind == MESSAGE_TYPE_DROP:
        reason = flow.event_type.sub_type
        return DROP_TEXT.get(reason, str(reason))
    return "UNKNOWN"


def verdict(flow: flow_pb2.Flow) -> str:
    """The verdict's name; a policy verdict says ALLOWED or DENIED, as Hubble's printer does."""
    policy = flow.event_type.type == MESSAGE_TYPE_POLICY_VERDICT
    if policy and flow.verdict in (flow_pb2.FORWARDED, flow_pb2.REDIRECTED):
        return "ALLOWED"
    if policy and flow.verdict in (flow_pb2.DROPPED, flow_pb2.ERROR):
        return "DENIED"
    return flow_pb2.Verdict.Name(flow.verdict)


def summary(flow: flow_pb2.Flow) -> str:
    """The summary, ``Auth: SPIRE`` if the policy asked for it, ``Encrypted: WireGuard`` if encrypted.

    ``IP.encrypted`` means the packet was seen on authd's tunnel, authd's only encryption between nodes.
    """
    parts = [flow.Summary] if flow.Summary else []
    if flow.auth_type != flow_pb2.DISABLED:
        parts.append(f"Auth: {flow_pb2.AuthType.Name(flow.auth_type)}")
    if flow.IP.encrypted:
        parts.append("Encrypted: WireGuard")
    return "; ".join(parts)


def compact(flow: flow_pb2.Flow, *, tz: tzinfo | None = None, node_name: bool = False) -> str:
    """One line in Hubble's compact format."""
    src, dst = hosts(flow)
    src_id, dst_id = identity(flow.source), identity(flow.destination)
    arrow = "->"
    if not flow.HasField("is_reply"):
        arrow = "<>"
    elif flow.is_reply.value:
        src, dst, src_id, dst_id, arrow = dst, src, dst_id, src_id, "<-"
    node = f" [{flow.node_name}]" if node_name else ""
    return (
        f"{timestamp(flow, tz)}{node}: {src} {src_id} {arrow} {dst} {dst_id} "
        f"{flow_type(flow)} {verdict(flow)} ({summary(flow)})"
    )


def block(flow: flow_pb2.Flow, *, first: bool, tz: tzinfo | None = None, node_name: bool = False) -> str:
    """Hubble's ``dict`` form: one ``KEY: value`` line each, separated from the previous flow."""
    src, dst = hosts(flow)
    lines = [] if first else [DICT_SEPARATOR]
    lines.append(f"  TIMESTAMP: {timestamp(flow, tz)}")
    if node_name:
        lines.append(f"       NODE: {flow.node_name}")
    lines += [
        f"     SOURCE: {src}",
        f"DESTINATION: {dst}",
        f"       TYPE: {flow_type(flow)}",
        f"    VERDICT: {verdict(flow)}",
        f"    SUMMARY: {summary(flow)}",
    ]
    return "\n".join(lines)
