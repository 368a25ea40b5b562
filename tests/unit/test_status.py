from __future__ import annotations

import json
import logging

import pytest
import structlog

from authd import log as logsetup
from authd.daemonview import DaemonView
from authd.health import Health
from authd.logbook import Logbook
from authd.status import StatusOp, render, report
from tests.fakes.ca import TestCA as FakeCA
from tests.fakes.daemonview import API, DB, OWN, WEB, build


@pytest.fixture
def ca() -> FakeCA:
    return FakeCA.create("example.org")


def test_report_names_svids_peers_and_usage(ca: FakeCA) -> None:
    view, parts = build(ca)
    status = report(view, runtime={"config": "/etc/authd/authd.toml"}, uptime=12.3)
    json.dumps(status)  # what the control socket sends
    own = parts.store.own_svid()
    assert own is not None
    assert status["svids"]["own"] == {
        "spiffe_id": str(OWN),
        "expires": own.not_after.isoformat(),
        "expires_in_s": round((own.not_after - view.now()).total_seconds()),
    }
    assert [w["spiffe_id"] for w in status["svids"]["workloads"]] == [str(WEB)]
    peers = {p["spiffe_id"]: p for p in status["peers"]}
    assert peers[str(DB)]["attested"]
    assert peers[str(DB)]["address"] == "10.0.0.2"
    assert peers[str(API)] == {
        "spiffe_id": str(API),
        "node": "node-b",
        "attested": False,
        "refused": True,
        "last_failure": "not-hosted",
        "in_flight": False,
    }
    assert status["auth_map"] == {"entries": 3, "capacity": 1024, "reconciles": 4, "fail_closed_in_s": 90}
    assert status["datapath"]["interfaces"] == ["lxc0", "lxc1"]
    assert (status["datapath"]["allowed"], status["datapath"]["denied"]) == (14, 10)  # 6 want kTLS
    assert status["spire"]["connected"] is False  # a workload stream is down
    assert status["spire"]["streams_down"] == {"delegated-svids[unix:uid:1000]": "UNAVAILABLE"}
    assert status["cluster"]["version"] == "abababababab"
    assert status["recent"][0]["event"] == "attestation failed"
    assert not status["ready"]


def test_render_is_what_an_operator_reads(ca: FakeCA) -> None:
    view, _ = build(ca)
    text = render(report(view, runtime={}, uptime=3600))
    assert "authd 0.1.0 on node node-a" in text
    assert "starting, healthy" in text
    assert "first entry expires in 90s unless renewed" in text
    assert "spire:     NOT CONNECTED (delegated-svids[unix:uid:1000]: UNAVAILABLE)" in text
    assert f"own SVID:  {OWN} expires " in text
    assert f"{DB} at node-b: attested via 10.0.0.2, expires" in text
    assert f"{API} at node-b: NOT attested: not-hosted (refused)" in text
    assert "auth map:  3 entries of 1024" in text
    assert "datapath:  attached (tcx) to 2 interfaces: lxc0, lxc1" in text
    assert "DEGRADED:  ahead of authd on lxc1 (ifindex 7): ingress prog 42 (other_cni)" in text
    assert "order:     authd placed itself first again 1 times" in text
    assert "cluster:   version abababababab, 2 applied, 1 rejected, last problem: node[2].name: bad" in text
    assert "warning attestation failed reason=not-hosted" in text


def test_render_without_spire_or_datapath() -> None:
    view = DaemonView(node="node-a", health=Health())
    text = render(report(view, runtime={}))
    assert "spire:     not configured" in text
    assert "datapath:  disabled" in text
    assert "recent warnings and errors: none" in text


async def test_status_op_answers_once(ca: FakeCA) -> None:
    view, _ = build(ca)
    answers = [answer async for answer in StatusOp(view, runtime={"metrics": "disabled"})({"op": "status"})]
    assert len(answers) == 1
    assert answers[0]["runtime"] == {"metrics": "disabled"}


def test_logbook_keeps_recent_warnings_and_errors_only() -> None:
    book = Logbook(size=3)
    saved, root = structlog.get_config(), logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    logsetup.configure("info", "json", logbook=book)
    try:
        log = structlog.get_logger("test")
        log.info("routine", n=1)
        for n in range(4):
            log.warning("attestation failed", reason="timeout", n=n, detail="x" * 500)
        log.error("critical job failed", job="datapath")
    finally:  # logging is process-wide: leave it as the other tests expect it
        structlog.configure(**saved)
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
    entries = book.entries()
    assert [e.event for e in entries] == ["attestation failed", "attestation failed", "critical job failed"]
    assert entries[0].fields["n"] == "2"
    assert len(entries[0].fields["detail"]) == 200
    assert entries[-1].level == "error"
    assert book.total == 5
