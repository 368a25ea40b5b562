from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path

import pytest
from google.protobuf.wrappers_pb2 import BoolValue

from authd.datapath.layout import AuthType, Direction, DropReason, PolicyMatch, Verdict
from authd.errors import ControlError
from authd.hubble import printer
from authd.hubble._proto import flow_pb2, observer_pb2
from authd.hubble.convert import flow_from_event
from authd.hubble.filters import FilterError, compile_filter, compile_lists
from authd.hubble.query import Query, parse_time
from authd.hubble.reasons import DROP_REASONS
from tests.unit.test_flows import NAMES, event

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = Path(__file__).parent / "golden" / "observe_compact.txt"


def test_every_drop_reason_has_one_hubble_row() -> None:
    for reason in DropReason:
        if reason is not DropReason.NONE:
            assert reason.name in DROP_REASONS
    for row in DROP_REASONS.values():
        assert flow_pb2.DropReason.Name(row.reason) == row.name


def _events() -> list[tuple[str, object]]:
    denied = event(verdict=Verdict.DENIED, drop_reason=DropReason.AUTH_REQUIRED)
    return [
        ("allowed", event()),
        ("denied", denied),
        ("reply", event(tcp_flags=0x12, direction=Direction.EGRESS, local_identity=256, remote_identity=257)),
        ("expired", replace(denied, drop_reason=DropReason.AUTH_EXPIRED, tcp_flags=0x18)),
        ("world", event(remote_identity=0, remote_node=0, match=PolicyMatch.EXEMPT, auth_type=AuthType.NONE)),
        (
            "unnamed",
            event(
                direction=Direction.EGRESS, local_identity=256, remote_identity=999, match=PolicyMatch.NONE
            ),
        ),
        ("udp6", event(src=IPv6Address("fd00::5"), dst=IPv6Address("fd00::7"), protocol=17, tcp_flags=0)),
        ("icmp", event(protocol=1, src_port=None, dst_port=None, tcp_flags=0)),
        ("malformed", replace(denied, drop_reason=DropReason.MALFORMED, src=IPv4Address("10.0.9.9"))),
        ("encrypted", event(encrypted=True)),
        ("cleartext", replace(denied, drop_reason=DropReason.NOT_ENCRYPTED)),
    ]


def test_compact_lines_match_the_golden_file() -> None:
    lines = [printer.compact(flow_from_event(e, NAMES), tz=UTC) for _, e in _events()]  # type: ignore[arg-type]
    assert "\n".join(lines) + "\n" == GOLDEN.read_text()


def test_the_printer_writes_hubbles_documented_compact_lines() -> None:
    # Flows as a Cilium node reports them (pods, numeric identities), printed as `hubble observe` does.
    flow = flow_pb2.Flow(
        IP=flow_pb2.IP(source="10.0.0.1", destination="10.0.0.2"),
        l4=flow_pb2.Layer4(TCP=flow_pb2.TCP(source_port=38314, destination_port=80)),
        source=flow_pb2.Endpoint(identity=1654, namespace="default", pod_name="tiefighter"),
        destination=flow_pb2.Endpoint(identity=3257, namespace="default", pod_name="deathstar"),
        event_type=flow_pb2.CiliumEventType(type=5),
        policy_match_type=2,
        traffic_direction=flow_pb2.INGRESS,
        verdict=flow_pb2.FORWARDED,
        is_reply=BoolValue(value=False),
        node_name="kind-worker",
        Summary="TCP Flags: SYN",
    )
    flow.time.FromDatetime(datetime(2024, 6, 2, 11, 14, 46, 41000, tzinfo=UTC))
    assert printer.compact(flow, tz=UTC, node_name=True) == (
        "Jun  2 11:14:46.041 [kind-worker]: default/tiefighter:38314 (ID:1654) -> default/deathstar:80 "
        "(ID:3257) policy-verdict:L3-L4 INGRESS ALLOWED (TCP Flags: SYN)"
    )
    flow.event_type.CopyFrom(flow_pb2.CiliumEventType(type=1, sub_type=189))
    flow.verdict = flow_pb2.DROPPED
    flow.ClearField("is_reply")
    flow.auth_type = flow_pb2.SPIRE
    assert printer.compact(flow, tz=UTC) == (
        "Jun  2 11:14:46.041: default/tiefighter:38314 (ID:1654) <> default/deathstar:80 (ID:3257) "
        "Authentication required DROPPED (TCP Flags: SYN; Auth: SPIRE)"
    )


def test_dict_output_is_hubbles_block_form() -> None:
    flow = flow_from_event(event(), NAMES)
    first = printer.block(flow, first=True, tz=UTC, node_name=True)
    assert first.splitlines() == [
        "  TIMESTAMP: Nov 22 13:54:13.518",
        "       NODE: node-b",
        "     SOURCE: 10.0.1.5:44494",
        "DESTINATION: 10.0.2.7:80",
        "       TYPE: policy-verdict:L3-Only INGRESS",
        "    VERDICT: ALLOWED",
        "    SUMMARY: TCP Flags: SYN; Auth: SPIRE",
    ]
    assert printer.block(flow, first=False, tz=UTC).startswith("------------\n  TIMESTAMP:")


def test_json_lines_parse_strictly_with_stubs_generated_from_the_protos(tmp_path: Path) -> None:
    """protoc builds fresh stubs from authd's .proto files; a separate interpreter parses with them."""
    proto_dir = tmp_path / "authd" / "hubble" / "_proto"
    proto_dir.mkdir(parents=True)
    for name in ("flow.proto", "observer.proto"):
        shutil.copy(ROOT / "authd" / "hubble" / "_proto" / name, proto_dir / name)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "-I",
            str(tmp_path),
            f"--python_out={tmp_path}",
            str(proto_dir / "flow.proto"),
            str(proto_dir / "observer.proto"),
        ],
        check=True,
    )
    for package in (tmp_path / "authd", tmp_path / "authd" / "hubble", proto_dir):
        (package / "__init__.py").touch()
    lines = []
    for _, e in _events():
        response = observer_pb2.GetFlowsResponse(flow=flow_from_event(e, NAMES))  # type: ignore[arg-type]
        lines.append(printer.to_json(response))
    (tmp_path / "flows.jsonl").write_text("\n".join(lines) + "\n")
    script = (
        "import json, os, sys\n"
        "from google.protobuf import json_format\n"
        "from authd.hubble._proto import flow_pb2, observer_pb2\n"
        "assert observer_pb2.__file__.startswith(os.environ['PYTHONPATH']), observer_pb2.__file__\n"
        "out = []\n"
        "for line in open(sys.argv[1]):\n"
        "    r = json_format.Parse(line, observer_pb2.GetFlowsResponse())\n"
        "    f = r.flow\n"
        "    out.append([flow_pb2.Verdict.Name(f.verdict),\n"
        "                flow_pb2.DropReason.Name(f.drop_reason_desc),\n"
        "                flow_pb2.TrafficDirection.Name(f.traffic_direction),\n"
        "                flow_pb2.AuthType.Name(f.auth_type), f.node_name,\n"
        "                f.HasField('is_reply') and f.is_reply.value, list(f.source.labels), f.IP.source,\n"
        "                f.l4.WhichOneof('protocol'), f.IP.encrypted])\n"
        "print(json.dumps(out))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "flows.jsonl")],
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,
        env={"PYTHONPATH": str(tmp_path)},
    )
    parsed = dict(zip([n for n, _ in _events()], json.loads(result.stdout), strict=True))
    web = [f"spiffe:id={NAMES.identities[256]}", "authd:node=node-a"]
    assert parsed["allowed"] == [
        "FORWARDED",
        "DROP_REASON_UNKNOWN",
        "INGRESS",
        "SPIRE",
        "node-b",
        False,
        web,
        "10.0.1.5",
        "TCP",
        False,
    ]
    assert parsed["encrypted"][0] == "FORWARDED"
    assert parsed["encrypted"][-1] is True
    assert parsed["cleartext"][:2] == ["DROPPED", "UNENCRYPTED_TRAFFIC"]
    assert parsed["denied"][:5] == ["DROPPED", "AUTH_REQUIRED", "INGRESS", "SPIRE", "node-b"]
    assert parsed["reply"][2] == "EGRESS"
    assert parsed["reply"][5] is True
    assert parsed["world"][3:7] == ["DISABLED", "node-b", False, ["reserved:world"]]
    assert parsed["malformed"][1] == "INVALID_PACKET_DROPPED"
    assert parsed["udp6"][7:9] == ["fd00::5", "UDP"]
    assert parsed["icmp"][8] is None


@pytest.mark.parametrize(
    ("flt", "expected"),
    [
        (flow_pb2.FlowFilter(), True),
        (flow_pb2.FlowFilter(source_ip=["10.0.1.5"]), True),
        (flow_pb2.FlowFilter(source_ip=["10.0.1.0/24"]), True),
        (flow_pb2.FlowFilter(source_ip=["10.0.2.0/24"]), False),
        (flow_pb2.FlowFilter(destination_ip=["10.0.2.7", "fd00::/8"]), True),
        (flow_pb2.FlowFilter(source_label=["spiffe:id=spiffe://td/ns/app/*"]), True),
        (flow_pb2.FlowFilter(destination_label=["spiffe:id=spiffe://td/ns/app/sa/web"]), False),
        (flow_pb2.FlowFilter(source_identity=[256]), True),
        (flow_pb2.FlowFilter(destination_identity=[256]), False),
        (flow_pb2.FlowFilter(verdict=[flow_pb2.DROPPED]), False),
        (flow_pb2.FlowFilter(verdict=[flow_pb2.FORWARDED, flow_pb2.DROPPED]), True),
        (flow_pb2.FlowFilter(traffic_direction=[flow_pb2.EGRESS]), False),
        (flow_pb2.FlowFilter(protocol=["TCP"]), True),
        (flow_pb2.FlowFilter(protocol=["udp"]), False),
        (flow_pb2.FlowFilter(source_port=["44494"]), True),
        (flow_pb2.FlowFilter(destination_port=["443"]), False),
        (flow_pb2.FlowFilter(reply=[False]), True),
        (flow_pb2.FlowFilter(tcp_flags=[flow_pb2.TCPFlags(SYN=True)]), True),
        (flow_pb2.FlowFilter(tcp_flags=[flow_pb2.TCPFlags(SYN=True, ACK=True)]), False),
        (flow_pb2.FlowFilter(node_name=["node-*"]), True),
        (flow_pb2.FlowFilter(node_name=["node-a"]), False),
        (flow_pb2.FlowFilter(ip_version=[flow_pb2.IPv6]), False),
        (flow_pb2.FlowFilter(event_type=[flow_pb2.EventTypeFilter(type=5)]), True),
        (flow_pb2.FlowFilter(event_type=[flow_pb2.EventTypeFilter(type=1)]), False),
        (flow_pb2.FlowFilter(source_ip=["10.0.1.5"], destination_port=["443"]), False),
    ],
)
def test_filters(flt: flow_pb2.FlowFilter, expected: bool) -> None:  # noqa: FBT001
    assert compile_filter(flt)(flow_from_event(event(), NAMES)) is expected


def test_white_and_blacklists() -> None:
    flow = flow_from_event(event(), NAMES)
    ingress = flow_pb2.FlowFilter(traffic_direction=[flow_pb2.INGRESS])
    egress = flow_pb2.FlowFilter(traffic_direction=[flow_pb2.EGRESS])
    assert compile_lists([], [])(flow)
    assert compile_lists([egress, ingress], [])(flow)
    assert not compile_lists([egress], [])(flow)
    assert not compile_lists([ingress], [ingress])(flow)
    assert compile_lists([], [egress])(flow)


def test_filters_authd_cannot_evaluate_are_refused() -> None:
    for flt in (
        flow_pb2.FlowFilter(source_pod=["default/"]),
        flow_pb2.FlowFilter(http_path=["/"]),
        flow_pb2.FlowFilter(source_ip=["not-an-ip"]),
        flow_pb2.FlowFilter(source_port=["http"]),
    ):
        with pytest.raises(FilterError):
            compile_filter(flt)
    # A field from a newer Hubble arrives as an unknown field: refused, not ignored.
    unknown = flow_pb2.FlowFilter.FromString(bytes([0xF8, 0x3E, 0x01]))  # field 999, varint 1
    with pytest.raises(FilterError, match="does not know"):
        compile_filter(unknown)


NOW = datetime(2024, 11, 22, 14, 0, tzinfo=UTC)


def test_query_flags_become_a_get_flows_request() -> None:
    assert Query().to_request(NOW).number == 20
    assert Query(follow=True).to_request(NOW).number == 0
    assert Query(since="10m").to_request(NOW).number == 0
    request = Query(
        since="1h30m",
        until="2024-11-22T13:59:00Z",
        verdicts=["DROPPED", "allowed"],
        direction="ingress",
        ip=["10.0.1.5"],
        port=["80"],
        to_identity=["spiffe://td/ns/*"],
        from_identity=["256"],
    ).to_request(NOW)
    assert request.since.ToDatetime(UTC) == NOW - timedelta(hours=1, minutes=30)
    assert request.until.ToDatetime(UTC) == datetime(2024, 11, 22, 13, 59, tzinfo=UTC)
    assert len(request.whitelist) == 4  # ip and port each on either side
    sides = {
        (tuple(f.source_ip), tuple(f.destination_ip), tuple(f.source_port), tuple(f.destination_port))
        for f in request.whitelist
    }
    assert sides == {
        (("10.0.1.5",), (), ("80",), ()),
        (("10.0.1.5",), (), (), ("80",)),
        ((), ("10.0.1.5",), ("80",), ()),
        ((), ("10.0.1.5",), (), ("80",)),
    }
    for flt in request.whitelist:
        assert list(flt.verdict) == [flow_pb2.DROPPED, flow_pb2.FORWARDED]
        assert list(flt.traffic_direction) == [flow_pb2.INGRESS]
        assert list(flt.destination_label) == ["spiffe:id=spiffe://td/ns/*"]
        assert list(flt.source_identity) == [256]
    with pytest.raises(ControlError):
        Query(first=3, follow=True).to_request(NOW)
    with pytest.raises(ControlError):
        parse_time("yesterday", NOW)
