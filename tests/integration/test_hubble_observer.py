"""Hubble's Observer API over real gRPC: a client built from authd's protos against ObserverServer."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from authd.datapath.layout import DropReason, Verdict
from authd.errors import ControlError
from authd.flows import FlowLog
from authd.hubble import printer
from authd.hubble._proto import flow_pb2, observer_pb2
from authd.hubble.query import Query, flows
from authd.hubble.server import ObserverServer
from tests.fakes.names import FakeNames
from tests.unit.test_flows import NAMES, WHEN, event
from tests.waiting import eventually


@contextlib.asynccontextmanager
async def serving(server: ObserverServer) -> AsyncIterator[ObserverServer]:
    task = asyncio.create_task(server.run())
    try:
        await eventually(server.path.exists, within=5)
        yield server
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def stubs(channel: grpc.aio.Channel) -> tuple[object, object]:
    get_flows = channel.unary_stream(
        "/observer.Observer/GetFlows",
        request_serializer=observer_pb2.GetFlowsRequest.SerializeToString,
        response_deserializer=observer_pb2.GetFlowsResponse.FromString,
    )
    status = channel.unary_unary(
        "/observer.Observer/ServerStatus",
        request_serializer=observer_pb2.ServerStatusRequest.SerializeToString,
        response_deserializer=observer_pb2.ServerStatusResponse.FromString,
    )
    return get_flows, status


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_get_flows_follow_with_filters_and_server_status(tmp_path: Path) -> None:
    log = FlowLog(NAMES)
    log.add(event(src_port=1))
    log.add(event(src_port=2, verdict=Verdict.DENIED, drop_reason=DropReason.AUTH_REQUIRED))
    server = ObserverServer(log, tmp_path / "run" / "hubble.sock", tcp_port=free_port())
    async with serving(server):
        assert server.path.stat().st_mode & 0o777 == 0o600
        assert (tmp_path / "run").stat().st_mode & 0o777 == 0o700
        async with grpc.aio.insecure_channel(f"unix:{server.path}") as channel:
            get_flows, status = stubs(channel)
            request = observer_pb2.GetFlowsRequest(
                number=5,
                follow=True,
                whitelist=[flow_pb2.FlowFilter(verdict=[flow_pb2.DROPPED])],
                blacklist=[flow_pb2.FlowFilter(source_port=["3"])],
            )
            call = get_flows(request)  # type: ignore[operator]
            first = await call.read()
            assert (first.flow.l4.TCP.source_port, first.node_name) == (2, "node-b")
            log.add(event(src_port=3, verdict=Verdict.DENIED, drop_reason=DropReason.AUTH_REQUIRED))
            log.add(event(src_port=4))  # allowed: not on the whitelist
            log.add(event(src_port=5, verdict=Verdict.DENIED, drop_reason=DropReason.AUTH_EXPIRED))
            second = await asyncio.wait_for(call.read(), 5)
            assert second.flow.l4.TCP.source_port == 5
            assert second.flow.drop_reason_desc == flow_pb2.AUTH_REQUIRED
            call.cancel()
            answer = await status(observer_pb2.ServerStatusRequest())  # type: ignore[operator]
            assert (answer.num_flows, answer.seen_flows, answer.max_flows) == (5, 5, 4096)
            assert answer.version.startswith("authd ")
            refused = get_flows(  # type: ignore[operator]
                observer_pb2.GetFlowsRequest(whitelist=[flow_pb2.FlowFilter(source_pod=["default/"])])
            )
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await refused.read()
            assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.tcp_bound}") as tcp:
            get_flows, _ = stubs(tcp)
            ports = [r.flow.l4.TCP.source_port async for r in get_flows(observer_pb2.GetFlowsRequest())]  # type: ignore[operator]
            assert ports == [1, 2, 3, 4, 5]
    assert not server.path.exists()


MASK = b"\x0a\x04time"  # google.protobuf.FieldMask{paths: ["time"]}


@pytest.mark.parametrize(
    "extra",
    [
        b"\x52" + bytes([len(MASK)]) + MASK,  # field_mask = 10
        b"\xba\x3e" + bytes([len(MASK) + 2, 0x0A, len(MASK)]) + MASK,  # experimental = 999 {field_mask = 1}
    ],
    ids=["field_mask", "experimental"],
)
async def test_a_newer_hubble_clients_field_mask_is_answered_with_whole_flows(
    tmp_path: Path, extra: bytes
) -> None:
    """Newer Hubble clients add a field mask to GetFlowsRequest, which authd's proto lacks."""
    log = FlowLog(NAMES)
    log.add(event(src_port=1))
    server = ObserverServer(log, tmp_path / "hubble.sock")
    async with serving(server), grpc.aio.insecure_channel(f"unix:{server.path}") as channel:
        get_flows = channel.unary_stream(
            "/observer.Observer/GetFlows",
            request_serializer=bytes,
            response_deserializer=observer_pb2.GetFlowsResponse.FromString,
        )
        raw = observer_pb2.GetFlowsRequest(number=1).SerializeToString() + extra
        (answer,) = [r async for r in get_flows(raw)]
    assert answer.flow.l4.TCP.source_port == 1  # more than the mask asked for, which the printer reads
    assert answer.flow.source.labels


async def test_observe_merges_several_nodes_by_time(tmp_path: Path) -> None:
    logs = {}
    for node, seconds in (("node-a", (1, 4)), ("node-b", (2, 3))):
        logs[node] = FlowLog(FakeNames({256: "spiffe://td/web"}, {0: node}))
        for second in seconds:
            logs[node].add(event(src_port=second, timestamp=WHEN.replace(second=second)))
    a = ObserverServer(logs["node-a"], tmp_path / "a.sock")
    b = ObserverServer(logs["node-b"], tmp_path / "b.sock")
    async with serving(a), serving(b):
        request = Query(from_ip=["10.0.1.0/24"], direction="ingress").to_request(WHEN)
        merged = await asyncio.to_thread(list, flows([str(a.path), f"unix:{b.path}"], request))
        assert [(r.node_name, r.flow.l4.TCP.source_port) for r in merged] == [
            ("node-a", 1),
            ("node-b", 2),
            ("node-b", 3),
            ("node-a", 4),
        ]
        egress = Query(direction="egress").to_request(WHEN)
        assert await asyncio.to_thread(list, flows([str(a.path)], egress)) == []
    with pytest.raises(ControlError, match="is authd running"):
        await asyncio.to_thread(list, flows([str(a.path)], request))


async def test_observe_reads_other_nodes_through_their_sockets_and_prints_the_hubble_way(
    tmp_path: Path,
) -> None:
    servers = []
    for node, port in (("node-a", 1), ("node-b", 2)):
        log = FlowLog(FakeNames({256: "spiffe://td/web", 257: "spiffe://td/db"}, {0: node}))
        log.add(event(src_port=port, timestamp=WHEN.replace(second=port)))
        log.add(event(src_port=9, remote_identity=0, timestamp=WHEN))  # from the world: filtered out
        servers.append(ObserverServer(log, tmp_path / f"{node}.sock"))
    a, b = servers
    async with serving(a), serving(b):
        cli = [sys.executable, "-m", "authd", "observe", "--node", str(a.path), "--node", f"unix:{b.path}"]
        compact = await run_cli(*cli, "--print-node-name", "--from-identity", "spiffe://td/*")
        as_json = await run_cli(
            *cli, "-o", "json", "--verdict", "FORWARDED", "--from-port", "1", "--from-port", "2"
        )
    assert [line.split("]: ", 1)[0].rsplit(" [", 1)[1] for line in compact] == ["node-a", "node-b"]
    for line in compact:
        assert (
            "(ID:spiffe://td/web) -> 10.0.2.7:80 (ID:spiffe://td/db) policy-verdict:L3-Only INGRESS ALLOWED"
            in line
        )
    parsed = [printer.from_json(line) for line in as_json]
    assert [(r.node_name, r.flow.l4.TCP.source_port) for r in parsed] == [("node-a", 1), ("node-b", 2)]


async def run_cli(*argv: str) -> list[str]:
    process = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode == 0, err.decode()
    return out.decode().splitlines()


async def test_a_node_without_datapath_says_so(tmp_path: Path) -> None:
    server = ObserverServer(None, tmp_path / "hubble.sock")
    async with serving(server):
        request = observer_pb2.GetFlowsRequest()
        with pytest.raises(ControlError, match="the datapath is disabled"):
            await asyncio.to_thread(list, flows([str(server.path)], request))
