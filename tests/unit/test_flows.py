from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from ipaddress import IPv4Address, IPv6Address
from typing import Any

import pytest

from authd.datapath.events import FlowEvent
from authd.datapath.layout import AuthType, Direction, DropReason, Hook, PolicyMatch, Verdict
from authd.errors import ControlError
from authd.flows import Flow, FlowFilter, FlowLog, NoNames, render, serve_observe
from tests.fakes.names import FakeNames

WEB, DB = "spiffe://td/ns/app/sa/web", "spiffe://td/ns/app/sa/db"
NAMES = FakeNames({256: WEB, 257: DB}, {0: "node-a", 2: "node-b"})
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


def line(e: FlowEvent, names: Any = NAMES) -> str:
    return render(Flow.from_json(Flow.from_event(e, names).to_json()), UTC)


def test_allowed_flow_renders_like_hubble() -> None:
    assert line(event()) == (
        "Nov 22 13:54:13.518: 10.0.1.5:44494 (spiffe://td/ns/app/sa/web) -> 10.0.2.7:80 "
        "(spiffe://td/ns/app/sa/db) policy-verdict:auth INGRESS ALLOWED (TCP Flags: SYN; Auth: SPIRE)"
    )


def test_denied_flow_carries_the_drop_reason() -> None:
    denied = event(verdict=Verdict.DENIED, drop_reason=DropReason.AUTH_REQUIRED)
    assert line(denied).endswith(
        "policy-verdict:auth INGRESS DENIED "
        "(TCP Flags: SYN; Auth: SPIRE; Drop reason: Authentication required)"
    )
    expired = event(verdict=Verdict.DENIED, drop_reason=DropReason.AUTH_EXPIRED, tcp_flags=0x18)
    assert line(expired).endswith("(TCP Flags: PSH, ACK; Auth: SPIRE; Drop reason: Authentication expired)")


def test_egress_puts_the_local_identity_first_and_unknown_handles_show_as_numbers() -> None:
    egress = event(
        direction=Direction.EGRESS, local_identity=256, remote_identity=999, match=PolicyMatch.NONE
    )
    egress = replace(egress, auth_type=AuthType.NONE, tcp_flags=0x12)
    assert line(egress) == (
        "Nov 22 13:54:13.518: 10.0.1.5:44494 (spiffe://td/ns/app/sa/web) -> 10.0.2.7:80 (999) "
        "policy-verdict:none EGRESS ALLOWED (TCP Flags: SYN, ACK)"
    )
    world = event(remote_identity=0, match=PolicyMatch.EXEMPT, auth_type=AuthType.NONE)
    assert "10.0.1.5:44494 (world) -> " in line(world, NoNames())
    assert "(257) policy-verdict:exempt" in line(world, NoNames())


def test_ipv6_udp_and_icmp_rendering() -> None:
    udp = event(src=IPv6Address("fd00::5"), dst=IPv6Address("fd00::7"), protocol=17, tcp_flags=0)
    assert "[fd00::5]:44494 (spiffe://td/ns/app/sa/web) -> [fd00::7]:80" in line(udp)
    assert line(udp).endswith("INGRESS ALLOWED (UDP; Auth: SPIRE)")
    icmp = event(protocol=1, src_port=None, dst_port=None, tcp_flags=0)
    assert "10.0.1.5 (spiffe://td/ns/app/sa/web) -> 10.0.2.7 (spiffe://td/ns/app/sa/db)" in line(icmp)
    assert line(icmp).endswith("(ICMPv4; Auth: SPIRE)")


def test_time_is_shown_in_the_given_zone_with_a_space_padded_day() -> None:
    early = event(timestamp=datetime(2024, 11, 2, 23, 30, 0, 5000, tzinfo=UTC))
    flow = Flow.from_event(early, NAMES)
    assert render(flow, timezone(timedelta(hours=2))).startswith("Nov  3 01:30:00.005: ")


def test_json_round_trip_keeps_everything() -> None:
    flow = Flow.from_event(event(verdict=Verdict.DENIED, drop_reason=DropReason.AUTH_REQUIRED), NAMES)
    data = flow.to_json()
    assert data["source"] == {"ip": "10.0.1.5", "port": 44494, "identity": 256, "spiffe_id": WEB}
    assert data["remote_node"] == {"handle": 2, "name": "node-b"}
    assert data["drop_reason"] == "AUTH_REQUIRED"
    assert Flow.from_json(data) == flow
    with pytest.raises(ControlError, match="malformed flow"):
        Flow.from_json({"time": "yesterday"})


@pytest.mark.parametrize(
    ("flt", "expected"),
    [
        (FlowFilter(), True),
        (FlowFilter(identity=WEB), True),
        (FlowFilter(identity=DB), True),
        (FlowFilter(identity="256"), True),
        (FlowFilter(identity="spiffe://td/other"), False),
        (FlowFilter(verdict=Verdict.ALLOWED), True),
        (FlowFilter(verdict=Verdict.DENIED), False),
        (FlowFilter(direction=Direction.EGRESS), False),
        (FlowFilter(identity=WEB, direction=Direction.INGRESS), True),
    ],
)
def test_filters(flt: FlowFilter, expected: bool) -> None:  # noqa: FBT001
    assert flt(Flow.from_event(event(), NAMES)) is expected
    assert FlowFilter.from_request(flt.to_request()) == flt


def test_filter_requests_are_validated() -> None:
    with pytest.raises(ControlError):
        FlowFilter.from_request({"verdict": "maybe"})
    with pytest.raises(ControlError):
        FlowFilter.from_request({"identity": 7})


def test_flow_log_keeps_the_last_n_and_filters() -> None:
    log = FlowLog(NAMES, capacity=3)
    for port in range(5):
        log.add(event(src_port=port, verdict=Verdict.DENIED if port % 2 else Verdict.ALLOWED))
    assert [f.source.port for f in log] == [2, 3, 4]
    assert [f.source.port for f in log.last(2, FlowFilter())] == [3, 4]
    assert [f.source.port for f in log.last(5, FlowFilter(verdict=Verdict.ALLOWED))] == [2, 4]
    assert log.last(0, FlowFilter()) == []


async def test_slow_followers_lose_flows_counted_and_never_block() -> None:
    log = FlowLog(NAMES, follower_queue=2)
    follower = log.follow(FlowFilter(verdict=Verdict.DENIED))
    for port in range(6):
        log.add(event(src_port=port, verdict=Verdict.DENIED))
    log.add(event(src_port=99))  # filtered out, never queued
    first, lost = await follower.next()
    assert (first.source.port, lost) == (0, 4)
    second, lost = await follower.next()
    assert (second.source.port, lost) == (1, 0)
    log.unfollow(follower)


async def test_observe_replays_then_follows() -> None:
    log = FlowLog(NAMES, follower_queue=1)
    for port in range(3):
        log.add(event(src_port=port))
    replay = [r async for r in serve_observe(log, {"last": 2})]
    assert [r["source"]["port"] for r in replay] == [1, 2]

    stream = serve_observe(log, {"follow": True, "last": 1, "direction": "ingress"})
    assert (await anext(stream))["source"]["port"] == 2
    pending = asyncio.ensure_future(anext(stream))
    await asyncio.sleep(0)
    log.add(event(src_port=10))
    assert (await pending)["source"]["port"] == 10
    for port in (11, 12, 13):  # the queue holds one: 12 and 13 are lost
        log.add(event(src_port=port))
    assert await anext(stream) == {"lost": 2}
    assert (await anext(stream))["source"]["port"] == 11
    await stream.aclose()
    assert log._followers == set()


async def test_observe_refuses_bad_requests_and_too_many_followers() -> None:
    log = FlowLog(NAMES, max_followers=1)
    with pytest.raises(ControlError, match="last"):
        await anext(serve_observe(log, {"last": -1}))
    with pytest.raises(ControlError, match="last"):
        await anext(serve_observe(log, {"last": True}))
    log.follow(FlowFilter())
    with pytest.raises(ControlError, match="too many followers"):
        await anext(serve_observe(log, {"follow": True}))
