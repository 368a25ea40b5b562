from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta, timezone
from ipaddress import IPv4Address, IPv6Address

import pytest

from authd.datapath import clock
from authd.datapath.consumer import EventConsumer
from authd.datapath.events import AUTH_EVENT, FLOW_EVENT, AuthRequiredEvent, DecodeError, FlowEvent, decode
from authd.datapath.layout import AuthType, Direction, DropReason, Hook, PolicyMatch, Verdict
from authd.datapath.maps import AuthKey, IpcacheEntry, PolicyKey, ipcache_key
from authd.errors import DatapathError
from tests.fakes.ring import FakeRing

WHEN = datetime(2026, 3, 1, 12, 0, 0, 123456, tzinfo=UTC)
OFFSET = 37 * clock.NS_PER_S


def flow_record(**overrides: object) -> bytes:
    fields: dict[str, object] = {
        "type": 2,
        "ifindex": 5,
        "ts": clock.to_tai_ns(WHEN, OFFSET),
        "local": 256,
        "remote": 300,
        "node": 2,
        "verdict": 2,
        "direction": 1,
        "auth_type": 1,
        "reason": 1,
        "family": 4,
        "protocol": 6,
        "tcp_flags": 0x02,
        "hook": 2,
        "match": 2,
        "flags": 1,
        "sport": 44494,
        "dport": 80,
        "src": IPv4Address("10.0.1.5").packed + bytes(12),
        "dst": IPv4Address("10.0.2.7").packed + bytes(12),
    }
    fields.update(overrides)
    return FLOW_EVENT.pack(*fields.values())


def auth_record(family: int = 6, event_type: int = 1) -> bytes:
    src, dst = IPv6Address("fd00::1").packed, IPv6Address("fd00::2").packed
    return AUTH_EVENT.pack(
        event_type, 3, clock.to_tai_ns(WHEN, OFFSET), 256, 300, 4, 1, 2, 2, family, 17, src, dst
    )


def test_flow_event_decodes_every_field() -> None:
    event = decode(flow_record(), OFFSET)
    assert event == FlowEvent(
        timestamp=WHEN,
        verdict=Verdict.DENIED,
        direction=Direction.INGRESS,
        drop_reason=DropReason.AUTH_REQUIRED,
        match=PolicyMatch.AUTH,
        auth_type=AuthType.SPIRE,
        local_identity=256,
        remote_identity=300,
        remote_node=2,
        src=IPv4Address("10.0.1.5"),
        dst=IPv4Address("10.0.2.7"),
        protocol=6,
        src_port=44494,
        dst_port=80,
        tcp_flags=0x02,
        fragment=False,
        hook=Hook.EGRESS,
        ifindex=5,
    )
    assert (event.src_identity, event.dst_identity) == (300, 256)  # INGRESS: the remote is the source


def test_flow_without_ports_or_as_fragment() -> None:
    event = decode(flow_record(flags=2, sport=0, dport=0), OFFSET)
    assert isinstance(event, FlowEvent)
    assert (event.src_port, event.dst_port, event.fragment) == (None, None, True)


def test_flow_flags_say_reply_and_encrypted() -> None:
    event = decode(flow_record(flags=0x1 | 0x8 | 0x10, reason=10), OFFSET)
    assert isinstance(event, FlowEvent)
    assert (event.reply, event.encrypted, event.drop_reason) == (True, True, DropReason.NOT_ENCRYPTED)
    plain = decode(flow_record(), OFFSET)
    assert isinstance(plain, FlowEvent)
    assert not plain.encrypted


def test_auth_required_event_decodes() -> None:
    event = decode(auth_record(), OFFSET)
    assert event == AuthRequiredEvent(
        key=AuthKey(256, 300, 4, AuthType.SPIRE),
        direction=Direction.EGRESS,
        reason=DropReason.AUTH_EXPIRED,
        src=IPv6Address("fd00::1"),
        dst=IPv6Address("fd00::2"),
        protocol=17,
        ifindex=3,
        timestamp=WHEN,
    )


@pytest.mark.parametrize(
    "record",
    [
        b"",
        b"\x02\x00",
        flow_record()[:40],
        auth_record(event_type=9),
        auth_record(family=5),
        flow_record(verdict=7),
        flow_record(direction=0),
        flow_record(match=9),
        auth_record()[:50],
    ],
)
def test_records_that_break_the_contract_are_refused(record: bytes) -> None:
    with pytest.raises(DecodeError):
        decode(record, OFFSET)


def test_tai_conversion_is_exact_both_ways() -> None:
    tai = clock.to_tai_ns(WHEN, OFFSET)
    assert tai == (int(datetime(2026, 3, 1, 12, tzinfo=UTC).timestamp()) + 37) * clock.NS_PER_S + 123456000
    assert clock.from_tai_ns(tai, OFFSET) == WHEN
    other_zone = WHEN.astimezone(timezone(timedelta(hours=-5)))
    assert clock.to_tai_ns(other_zone, OFFSET) == tai


def test_tai_offset_is_whole_seconds_and_now_is_close() -> None:
    assert clock.tai_offset_ns() % clock.NS_PER_S == 0
    now = clock.from_tai_ns(clock.now_tai_ns())
    assert abs((now - datetime.now(UTC)).total_seconds()) < 1


def test_naive_datetimes_and_out_of_range_values() -> None:
    with pytest.raises(DatapathError, match="naive"):
        clock.to_tai_ns(datetime(2026, 1, 1))  # noqa: DTZ001 - the point of the test
    assert clock.to_tai_ns(datetime(1960, 1, 1, tzinfo=UTC), 0) == 0


def test_keys_refuse_values_the_maps_cannot_hold() -> None:
    with pytest.raises(DatapathError, match="32 bits"):
        AuthKey(2**32, 1, 1)
    with pytest.raises(DatapathError):
        PolicyKey(-1, 1, Direction.INGRESS)
    with pytest.raises(DatapathError):
        IpcacheEntry(1, 2**33)


def test_ipcache_keys_put_the_family_before_the_prefix() -> None:
    from ipaddress import ip_network  # noqa: PLC0415

    v4 = ipcache_key(ip_network("10.1.0.0/16"))
    assert v4[:4] == (32 + 16).to_bytes(4, "little")
    assert v4[4:8] == (4).to_bytes(4, "little")
    assert v4[8:12] == bytes([10, 1, 0, 0])
    v6 = ipcache_key(ip_network("fd00::/8"))
    assert v6[:8] == (32 + 8).to_bytes(4, "little") + (6).to_bytes(4, "little")


async def test_consumer_drains_stale_records_then_dispatches_both_rings() -> None:
    ring = FakeRing([flow_record(), flow_record()])
    auth_ring = FakeRing([auth_record()])
    flows: list[FlowEvent] = []
    auths: list[AuthRequiredEvent] = []
    consumer = EventConsumer(auth_ring, ring, auths.append, flows.append)
    task = asyncio.create_task(consumer.run())
    try:
        await asyncio.sleep(0.01)
        assert consumer.stale == 3
        ring.push(flow_record(), b"\x09\x00\x00\x00", flow_record(verdict=1, reason=0))
        auth_ring.push(auth_record())
        for _ in range(100):
            if consumer.decoded == 3:
                break
            await asyncio.sleep(0.01)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        ring.close()
        auth_ring.close()
    assert [f.verdict for f in flows] == [Verdict.DENIED, Verdict.ALLOWED]
    assert [a.key.remote for a in auths] == [300]
    assert consumer.malformed == 1
