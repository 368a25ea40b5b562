from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from datetime import UTC, datetime
from ipaddress import IPv4Address, IPv6Address
from typing import Any

import pytest

from authd.datapath.events import FlowEvent
from authd.datapath.layout import AuthType, Direction, DropReason, Hook, PolicyMatch, Verdict
from authd.errors import ControlError
from authd.flows import FlowLog, get_flows, server_status
from authd.hubble import printer
from authd.hubble._proto import flow_pb2, observer_pb2
from authd.hubble.convert import flow_from_event
from authd.hubble.filters import FilterError
from tests.fakes.names import FakeNames

WEB, DB = "spiffe://td/ns/app/sa/web", "spiffe://td/ns/app/sa/db"
NAMES = FakeNames({256: WEB, 257: DB}, {0: "node-b", 2: "node-a"})
WHEN = datetime(2024, 11, 22, 13, 54, 13, 518123, tzinfo=UTC)


def event(**overrides: Any) -> FlowEvent:
    base = FlowEvent(
        timestamp=WHEN,
        verdict=Verdict.ALLOWED,
        direction=Direction.INGRESS,
        drop_reason=DropReason.NONE,
        match=PolicyMatch.AUTH,
        auth_type=AuthType.SPIRE,
        local_identity=257,
        remote_identity=256,
        remote_node=2,
        src=IPv4Address("10.0.1.5"),
        dst=IPv4Address("10.0.2.7"),
        protocol=6,
        src_port=44494,
        dst_port=80,
        tcp_flags=0x02,
        fragment=False,
        hook=Hook.EGRESS,
        ifindex=4,
    )
    return replace(base, **overrides)


def test_an_allowed_flow_is_a_policy_verdict_with_spiffe_ids_in_the_labels() -> None:
    flow = flow_from_event(event(), NAMES)
    assert flow.verdict == flow_pb2.FORWARDED
    assert flow.event_type.type == 5
    assert flow.Type == flow_pb2.L3_L4
    assert flow.node_name == "node-b"
    assert flow.traffic_direction == flow_pb2.INGRESS
    assert flow.auth_type == flow_pb2.SPIRE
    assert flow.is_reply.value is False
    assert list(flow.source.labels) == [f"spiffe:id={WEB}", "authd:node=node-a"]
    assert list(flow.destination.labels) == [f"spiffe:id={DB}", "authd:node=node-b"]
    assert (flow.l4.TCP.source_port, flow.l4.TCP.destination_port, flow.l4.TCP.flags.SYN) == (44494, 80, True)
    assert flow.drop_reason_desc == flow_pb2.DROP_REASON_UNKNOWN
    assert len(flow.uuid) == 36
    assert flow.uuid != flow_from_event(event(), NAMES).uuid


def test_a_denied_flow_is_a_drop_with_hubbles_reason() -> None:
    flow = flow_from_event(event(verdict=Verdict.DENIED, drop_reason=DropReason.AUTH_REQUIRED), NAMES)
    assert flow.verdict == flow_pb2.DROPPED
    assert flow.drop_reason_desc == flow_pb2.AUTH_REQUIRED == 189
    assert flow.drop_reason == 189
    assert (flow.event_type.type, flow.event_type.sub_type) == (1, 189)
    expired = flow_from_event(event(verdict=Verdict.DENIED, drop_reason=DropReason.AUTH_EXPIRED), NAMES)
    assert expired.drop_reason_desc == flow_pb2.AUTH_REQUIRED
    malformed = flow_from_event(event(verdict=Verdict.DENIED, drop_reason=DropReason.MALFORMED), NAMES)
    assert malformed.drop_reason_desc == flow_pb2.INVALID_PACKET_DROPPED


def test_an_unknown_source_has_no_node_and_is_the_world() -> None:
    # The datapath reports node handle 0 for an address not in the ipcache: that is not this node.
    flow = flow_from_event(event(remote_identity=0, remote_node=0), NAMES)
    assert flow.source.identity == 2
    assert list(flow.source.labels) == ["reserved:world"]
    egress = flow_from_event(event(direction=Direction.EGRESS, remote_identity=999, remote_node=0), NAMES)
    assert list(egress.destination.labels) == ["authd:node=node-b"]  # a local handle without a name


async def test_observe_json_is_one_get_flows_response_per_line() -> None:
    log = FlowLog(NAMES)
    log.add(event(verdict=Verdict.DENIED, drop_reason=DropReason.AUTH_REQUIRED, tcp_flags=0x12))
    log.add(event(src=IPv6Address("fd00::5"), dst=IPv6Address("fd00::7"), protocol=17, tcp_flags=0))
    responses = get_flows(log, observer_pb2.GetFlowsRequest(number=10))
    denied, udp = [json.loads(printer.to_json(r)) async for r in responses]
    assert set(denied) == {"flow", "node_name", "time"}
    flow = denied["flow"]
    assert flow["verdict"] == "DROPPED"
    assert flow["drop_reason_desc"] == "AUTH_REQUIRED"
    assert flow["drop_reason"] == 189
    assert flow["Type"] == "L3_L4"
    assert flow["event_type"] == {"type": 1, "sub_type": 189}
    assert flow["traffic_direction"] == "INGRESS"
    assert flow["is_reply"] is True
    assert flow["auth_type"] == "SPIRE"
    assert flow["node_name"] == denied["node_name"] == "node-b"
    assert flow["IP"] == {"source": "10.0.1.5", "destination": "10.0.2.7", "ipVersion": "IPv4"}
    assert flow["l4"] == {
        "TCP": {"source_port": 44494, "destination_port": 80, "flags": {"SYN": True, "ACK": True}}
    }
    assert flow["time"] == "2024-11-22T13:54:13.518123Z"
    assert "is_reply" not in udp["flow"]
    assert udp["flow"]["l4"] == {"UDP": {"source_port": 44494, "destination_port": 80}}
    assert udp["flow"]["IP"]["ipVersion"] == "IPv6"


async def test_get_flows_number_first_since_until() -> None:
    log = FlowLog(NAMES, capacity=4)
    for second in range(6):
        log.add(event(src_port=second, timestamp=WHEN.replace(second=second)))

    async def ports(**fields: Any) -> list[int]:
        request = observer_pb2.GetFlowsRequest(**fields)
        return [r.flow.l4.TCP.source_port async for r in get_flows(log, request)]

    assert await ports() == [2, 3, 4, 5]  # the ring keeps 4
    assert await ports(number=2) == [4, 5]
    assert await ports(number=2, first=True) == [2, 3]
    since = observer_pb2.GetFlowsRequest().since
    since.FromDatetime(WHEN.replace(second=3))
    until = observer_pb2.GetFlowsRequest().until
    until.FromDatetime(WHEN.replace(second=4))
    assert await ports(since=since) == [3, 4, 5]
    assert await ports(since=since, until=until) == [3, 4]
    with pytest.raises(ControlError, match="first is incompatible"):
        await ports(first=True, follow=True)
    status = server_status(log, "1.0")
    assert (status.num_flows, status.max_flows, status.seen_flows) == (4, 4, 6)


async def test_follow_replays_then_streams_and_reports_losses() -> None:
    log = FlowLog(NAMES, follower_queue=1)
    for port in range(3):
        log.add(event(src_port=port))
    whitelist = [flow_pb2.FlowFilter(traffic_direction=[flow_pb2.INGRESS])]
    stream = get_flows(log, observer_pb2.GetFlowsRequest(follow=True, number=1, whitelist=whitelist))
    assert (await anext(stream)).flow.l4.TCP.source_port == 2
    pending = asyncio.ensure_future(anext(stream))
    await asyncio.sleep(0)
    log.add(event(src_port=10))
    assert (await pending).flow.l4.TCP.source_port == 10
    log.add(event(src_port=20, direction=Direction.EGRESS))  # filtered out, never queued
    for port in (11, 12, 13):  # the queue holds one: 12 and 13 are lost
        log.add(event(src_port=port))
    lost = await anext(stream)
    assert lost.lost_events.num_events_lost == 2
    assert lost.lost_events.source == flow_pb2.OBSERVER_EVENTS_QUEUE
    assert (await anext(stream)).flow.l4.TCP.source_port == 11
    await stream.aclose()
    assert log._followers == set()


async def test_follow_without_history_and_until_ends_the_stream() -> None:
    log = FlowLog(NAMES)
    log.add(event(src_port=1))
    request = observer_pb2.GetFlowsRequest(follow=True)
    request.until.FromDatetime(WHEN)
    stream = get_flows(log, request)
    pending = asyncio.ensure_future(anext(stream))
    await asyncio.sleep(0)
    log.add(event(src_port=2))
    assert (await pending).flow.l4.TCP.source_port == 2  # no history: only new flows
    log.add(event(src_port=3, timestamp=WHEN.replace(second=59)))
    with pytest.raises(StopAsyncIteration):
        await anext(stream)


async def test_bad_requests_and_too_many_followers_are_refused() -> None:
    log = FlowLog(NAMES, max_followers=1)
    pods = observer_pb2.GetFlowsRequest(whitelist=[flow_pb2.FlowFilter(source_pod=["x"])])
    with pytest.raises(FilterError, match="source_pod"):
        await anext(get_flows(log, pods))
    log.follow(lambda _flow: True)
    with pytest.raises(ControlError, match="too many followers"):
        await anext(get_flows(log, observer_pb2.GetFlowsRequest(follow=True)))
