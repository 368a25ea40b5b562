"""Hubble's ``flow.FlowFilter`` white- and blacklists, evaluated on authd's flows.

Within one filter every set field must match, and a repeated field matches when any of its values does;
a flow passes when any whitelist filter matches (or there is none) and no blacklist filter does, as in
Hubble. Fields about things authd has no notion of (pods, services, FQDNs, L7, traces) are refused with
:class:`FilterError`, and so is a filter with fields this proto does not know: a filter that cannot be
evaluated never silently matches everything. IP filters take addresses or CIDRs; label and node name
filters take ``*`` wildcards (``spiffe:id=spiffe://td/ns/*``).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Mapping, Sequence
from ipaddress import ip_address, ip_network
from types import MappingProxyType
from typing import Any

from google.protobuf import unknown_fields

from authd.errors import ControlError
from authd.hubble._proto import flow_pb2

Predicate = Callable[[flow_pb2.Flow], bool]

TCP_FLAG_FIELDS = ("FIN", "SYN", "RST", "PSH", "ACK", "URG", "ECE", "CWR", "NS")


class FilterError(ControlError):
    """A filter authd cannot evaluate faithfully."""


def _ip_matcher(specs: Iterable[str]) -> Callable[[str], bool]:
    try:
        networks = [ip_network(spec, strict=False) for spec in specs]
    except ValueError as err:
        raise FilterError(f"hubble: bad IP filter: {err}") from err

    def match(address: str) -> bool:
        try:
            ip = ip_address(address)
        except ValueError:
            return False
        return any(ip.version == net.version and ip in net for net in networks)

    return match


def _ports(specs: Iterable[str]) -> set[int]:
    try:
        return {int(spec) for spec in specs}
    except ValueError as err:
        raise FilterError(f"hubble: bad port filter: {err}") from err


def _port(flow: flow_pb2.Flow, side: str) -> int | None:
    kind = flow.l4.WhichOneof("protocol")
    if kind in ("TCP", "UDP", "SCTP"):
        return int(getattr(getattr(flow.l4, kind), f"{side}_port"))
    return None


def _labels(patterns: Iterable[str]) -> Callable[[flow_pb2.Endpoint], bool]:
    wanted = list(patterns)
    return lambda e: any(fnmatch.fnmatchcase(label, p) for p in wanted for label in e.labels)


def _flags(flow: flow_pb2.Flow, wanted: flow_pb2.TCPFlags) -> bool:
    if flow.l4.WhichOneof("protocol") != "TCP":
        return False
    have = flow.l4.TCP.flags
    return all(getattr(have, name) for name in TCP_FLAG_FIELDS if getattr(wanted, name))


def _event_type(flow: flow_pb2.Flow, wanted: flow_pb2.EventTypeFilter) -> bool:
    if flow.event_type.type != wanted.type:
        return False
    return not wanted.match_sub_type or flow.event_type.sub_type == wanted.sub_type


def _member(get: Callable[[flow_pb2.Flow], object]) -> Callable[[Sequence[Any]], Predicate]:
    def build(values: Sequence[Any]) -> Predicate:
        wanted = set(values)
        return lambda flow: get(flow) in wanted

    return build


def _ip(get: Callable[[flow_pb2.Flow], str]) -> Callable[[Sequence[Any]], Predicate]:
    def build(values: Sequence[Any]) -> Predicate:
        match = _ip_matcher(values)
        return lambda flow: match(get(flow))

    return build


def _port_of(side: str) -> Callable[[Sequence[Any]], Predicate]:
    def build(values: Sequence[Any]) -> Predicate:
        wanted = _ports(values)
        return lambda flow: _port(flow, side) in wanted

    return build


def _label_of(get: Callable[[flow_pb2.Flow], flow_pb2.Endpoint]) -> Callable[[Sequence[Any]], Predicate]:
    def build(values: Sequence[Any]) -> Predicate:
        match = _labels(values)
        return lambda flow: match(get(flow))

    return build


def _any_of(test: Callable[[flow_pb2.Flow, Any], bool]) -> Callable[[Sequence[Any]], Predicate]:
    def build(values: Sequence[Any]) -> Predicate:
        wanted = list(values)
        return lambda flow: any(test(flow, value) for value in wanted)

    return build


# One builder per supported FlowFilter field: from the field's values to a predicate on a flow.
CHECKS: Mapping[str, Callable[[Sequence[Any]], Predicate]] = MappingProxyType(
    {
        "uuid": _member(lambda f: f.uuid),
        "source_ip": _ip(lambda f: f.IP.source),
        "destination_ip": _ip(lambda f: f.IP.destination),
        "source_label": _label_of(lambda f: f.source),
        "destination_label": _label_of(lambda f: f.destination),
        "source_identity": _member(lambda f: f.source.identity),
        "destination_identity": _member(lambda f: f.destination.identity),
        "traffic_direction": _member(lambda f: f.traffic_direction),
        "verdict": _member(lambda f: f.verdict),
        "event_type": _any_of(_event_type),
        "protocol": lambda values: _member(lambda f: (f.l4.WhichOneof("protocol") or "").lower())(
            [v.lower() for v in values]
        ),
        "source_port": _port_of("source"),
        "destination_port": _port_of("destination"),
        "reply": _member(lambda f: f.is_reply.value),
        "tcp_flags": _any_of(_flags),
        "node_name": _any_of(lambda f, pattern: fnmatch.fnmatchcase(f.node_name, pattern)),
        "ip_version": _member(lambda f: f.IP.ipVersion),
    }
)


def compile_filter(flt: flow_pb2.FlowFilter) -> Predicate:
    """A predicate for one filter; raise :class:`FilterError` for what authd cannot evaluate."""
    if len(unknown_fields.UnknownFieldSet(flt)):
        raise FilterError("hubble: the filter has fields authd does not know")
    checks: list[Predicate] = []
    for descriptor, values in flt.ListFields():
        build = CHECKS.get(descriptor.name)
        if build is None:
            raise FilterError(f"hubble: authd cannot filter on {descriptor.name}")
        checks.append(build(values))
    return lambda flow: all(check(flow) for check in checks)


def compile_lists(
    whitelist: Iterable[flow_pb2.FlowFilter], blacklist: Iterable[flow_pb2.FlowFilter]
) -> Predicate:
    """Whitelist minus blacklist, as ``GetFlowsRequest`` defines them."""
    allow = [compile_filter(f) for f in whitelist]
    deny = [compile_filter(f) for f in blacklist]
    return lambda flow: (not allow or any(p(flow) for p in allow)) and not any(p(flow) for p in deny)
