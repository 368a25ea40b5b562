"""Attach order: authd's tcx links run before every other program, survive restarts, and report intruders.

The foreign program stands for another CNI's tcx program (Cilium's on ``lxc*``): it returns TC_ACT_OK,
which ends the hook, so whatever runs after it never sees the packet.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from ipaddress import ip_network
from pathlib import Path
from typing import Any

import pytest

from authd.datapath import libbpf, syscalls, tcx
from authd.datapath.attach import AttachMode, Hook
from authd.datapath.layout import TC_HANDLE, TC_PRIORITY, AuthType, Direction
from authd.datapath.loader import Datapath
from authd.datapath.maps import IpcacheEntry, PinnedMaps, PolicyKey
from tests.privileged.conftest import SIZES
from tests.privileged.daemon import Authd
from tests.privileged.test_datapath_netns import EchoServer, connects
from tests.privileged.topology import A4, B4, Topology, sh

pytestmark = pytest.mark.privileged

A, B = 300, 400
TC_ACT_OK = 0
HOOKS = (tcx.BPF_TCX_INGRESS, tcx.BPF_TCX_EGRESS)


class Foreign:
    """A program returning TC_ACT_OK, attached first (tcx) on both hooks of both workload links."""

    def __init__(self, topo: Topology) -> None:
        self.topo = topo
        self.prog = syscalls.prog_load_trivial(TC_ACT_OK, b"foreign_ok")
        self.prog_id = syscalls.prog_info(self.prog).id
        self.links: list[int] = []

    def attach(self) -> None:
        def run() -> None:
            for link in (self.topo.link_a, self.topo.link_b):
                index = socket.if_nametoindex(link)
                self.links.extend(tcx.link_create_first(self.prog, index, hook) for hook in HOOKS)

        self.topo.run(self.topo.node, run)

    def close(self) -> None:
        for fd in self.links:
            os.close(fd)  # the last reference to an unpinned link: it detaches
        self.links.clear()
        if self.prog >= 0:
            os.close(self.prog)
            self.prog = -1


@pytest.fixture
def foreign(topology: Topology) -> Iterator[Foreign]:
    program = Foreign(topology)
    try:
        yield program
    finally:
        program.close()


def order(topo: Topology, link: str, hook: int) -> list[int]:
    """Program ids on a tcx hook, in the order they run."""
    return topo.run(topo.node, lambda: [e.prog_id for e in tcx.query(socket.if_nametoindex(link), hook)])


def link_ids(topo: Topology, link: str) -> list[int]:
    return topo.run(
        topo.node,
        lambda: [e.link_id for hook in HOOKS for e in tcx.query(socket.if_nametoindex(link), hook)],
    )


def require_auth(maps: PinnedMaps) -> None:
    """A's and B's addresses are local endpoints and B accepts A only when authenticated."""
    maps.ipcache.update_many(
        {ip_network(f"{A4}/32"): IpcacheEntry(A, 0), ip_network(f"{B4}/32"): IpcacheEntry(B, 0)}
    )
    maps.policy.update_many({PolicyKey(B, A, Direction.INGRESS): AuthType.SPIRE})


def attach_both(topo: Topology, datapath: Datapath) -> None:
    def run() -> None:
        for link in (topo.link_a, topo.link_b):
            datapath.attach(socket.if_nametoindex(link), l3=False)

    topo.run(topo.node, run)


def test_authd_runs_first_before_a_foreign_program_and_keeps_one_link_across_restarts(
    topology: Topology, pin_dir: Path, foreign: Foreign
) -> None:
    server = EchoServer(topology)
    first = Datapath.load(pin_dir, SIZES)
    try:
        with first.maps() as maps:
            require_auth(maps)
        foreign.attach()  # installed before authd, like a CNI on the pod's interface
        assert connects(topology, B4)  # authd is not there yet
        attach_both(topology, first)
        ours = first.attacher.prog_ids
        for link in (topology.link_a, topology.link_b):
            for hook in HOOKS:
                running = order(topology, link, hook)
                assert running[0] in ours, running
                assert running[1:] == [foreign.prog_id]
        assert not connects(topology, B4)  # authd's program runs first and drops
        index = topology.ifindex(topology.link_b)
        assert topology.run(topology.node, lambda: first.attacher.ahead(index, l3=False)) == []
        links_before = link_ids(topology, topology.link_b)
        attach_both(topology, first)  # attaching again changes nothing
        assert link_ids(topology, topology.link_b) == links_before
    finally:
        first.close()
    second = Datapath.load(pin_dir, SIZES)  # a restart: new programs, the same links
    try:
        attach_both(topology, second)
        assert link_ids(topology, topology.link_b) == links_before
        running = order(topology, topology.link_b, tcx.BPF_TCX_INGRESS)
        assert running[0] in second.attacher.prog_ids
        assert running[0] not in ours  # swapped in place
        assert len(running) == 2  # no duplicate link
        assert not connects(topology, B4)
    finally:
        second.close()
        server.close()


def test_pins_of_links_whose_interface_is_gone_are_collected(topology: Topology, datapath: Datapath) -> None:
    gone = f"adp{topology.tag}x"
    sh("ip", "-n", topology.node, "link", "add", gone, "type", "veth", "peer", "name", f"adp{topology.tag}y")
    links = datapath.attacher.pin_dir / "links"

    def attach() -> None:
        for link in (topology.link_a, gone):
            datapath.attach(socket.if_nametoindex(link), l3=False)

    topology.run(topology.node, attach)
    index_a = topology.ifindex(topology.link_a)
    kept = topology.run(
        topology.node, lambda: {datapath.attacher.link_pin(index_a, hook).name for hook in Hook}
    )
    pins = {path.name for path in links.iterdir()}
    assert len(pins - kept) == 2
    assert datapath.attacher.collect_defunct() == []  # every interface is there
    sh("ip", "-n", topology.node, "link", "del", gone)
    assert sorted(datapath.attacher.collect_defunct()) == sorted(pins - kept)
    assert {path.name for path in links.iterdir()} == kept
    assert (
        topology.run(
            topology.node, lambda: datapath.attacher.verify(topology.ifindex(topology.link_a), l3=False)
        )
        == []
    )


def test_a_foreign_program_placed_ahead_is_found_and_displaced(
    topology: Topology, datapath: Datapath, foreign: Foreign
) -> None:
    attach_both(topology, datapath)
    foreign.attach()  # after authd: BPF_F_BEFORE puts it ahead
    index = topology.ifindex(topology.link_b)
    ahead = topology.run(topology.node, lambda: datapath.attacher.ahead(index, l3=False))
    assert {(f.hook, f.prog_id, f.name) for f in ahead} == {
        (Hook.INGRESS, foreign.prog_id, "foreign_ok"),
        (Hook.EGRESS, foreign.prog_id, "foreign_ok"),
    }
    spare = datapath.spare_programs()
    pins_before = sorted(p.name for p in (datapath.pin_dir / "links").iterdir())
    topology.run(topology.node, lambda: datapath.attacher.reassert_first(index, l3=False, spare=spare))
    assert topology.run(topology.node, lambda: datapath.attacher.ahead(index, l3=False)) == []
    running = order(topology, topology.link_b, tcx.BPF_TCX_INGRESS)
    assert running == [*sorted(datapath.attacher.prog_ids & set(running)), foreign.prog_id]
    assert len(running) == 2  # the old link is gone
    assert sorted(p.name for p in (datapath.pin_dir / "links").iterdir()) == pins_before


def test_tc_fallback_attaches_filters_and_reports_any_tcx_program_as_ahead(
    topology: Topology, pin_dir: Path, foreign: Foreign
) -> None:
    server = EchoServer(topology)
    datapath = Datapath.load(pin_dir, SIZES, mode=AttachMode.TC)  # what kernels before 6.6 get
    try:
        with datapath.maps() as maps:
            require_auth(maps)
        attach_both(topology, datapath)
        index = topology.ifindex(topology.link_b)
        tc_prog = topology.run(
            topology.node,
            lambda: libbpf.tc_query(index, libbpf.BPF_TC_INGRESS, handle=TC_HANDLE, priority=TC_PRIORITY),
        )
        assert tc_prog in datapath.attacher.prog_ids
        assert order(topology, topology.link_b, tcx.BPF_TCX_INGRESS) == []
        assert not (pin_dir / "links").exists() or not list((pin_dir / "links").iterdir())
        assert not connects(topology, B4)
        foreign.attach()  # tcx runs before every tc filter: the bypass this issue is about
        assert connects(topology, B4)
        ahead = topology.run(topology.node, lambda: datapath.attacher.ahead(index, l3=False))
        assert {f.describe() for f in ahead} == {
            f"ingress prog {foreign.prog_id} (foreign_ok)",
            f"egress prog {foreign.prog_id} (foreign_ok)",
        }
    finally:
        datapath.close()
    upgraded = Datapath.load(pin_dir, SIZES)  # tcx again: the tc filter goes, authd runs first
    try:
        attach_both(topology, upgraded)
        assert (
            topology.run(
                topology.node,
                lambda: libbpf.tc_query(index, libbpf.BPF_TC_INGRESS, handle=TC_HANDLE, priority=TC_PRIORITY),
            )
            is None
        )
        assert order(topology, topology.link_b, tcx.BPF_TCX_INGRESS)[0] in upgraded.attacher.prog_ids
        assert not connects(topology, B4)
    finally:
        upgraded.close()
        server.close()


def status(authd: Authd) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "authd", "status", "--json", "--config", str(authd.config)],
        capture_output=True,
        text=True,
        check=True,
    )
    return dict(json.loads(done.stdout))


def wait_for(check: Callable[[], bool], timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return False


def datapath_health(report: dict[str, Any]) -> dict[str, Any]:
    return next(c for c in report["health"] if c["name"] == "datapath")


@pytest.mark.parametrize("reassert", [True, False], ids=["reasserts", "reports"])
def test_the_daemon_finds_foreign_programs_ahead(
    topology: Topology, authd: Authd, foreign: Foreign, *, reassert: bool
) -> None:
    text = authd.config.read_text()
    extra = f'order_check_interval = "200ms"\nreassert_first = {str(reassert).lower()}\n'
    authd.config.write_text(text.replace("[datapath]\n", "[datapath]\n" + extra))
    authd.start()
    assert datapath_health(status(authd))["state"] == "ready"
    foreign.attach()
    if reassert:

        def first_again() -> bool:
            report = status(authd)
            running = order(topology, topology.link_b, tcx.BPF_TCX_INGRESS)
            return report["datapath"]["reassertions"] >= 2 and running[-1] == foreign.prog_id

        assert wait_for(first_again)
        report = status(authd)
        assert report["datapath"]["programs_ahead"] == {}
        assert datapath_health(report)["state"] == "ready"
    else:
        assert wait_for(lambda: datapath_health(status(authd))["state"] == "degraded")
        report = status(authd)
        where = f"adp{topology.tag}b (ifindex {topology.ifindex(topology.link_b)})"
        assert report["datapath"]["programs_ahead"][where] == [
            f"ingress prog {foreign.prog_id} (foreign_ok)",
            f"egress prog {foreign.prog_id} (foreign_ok)",
        ]
        assert where in datapath_health(report)["reason"]
        foreign.close()  # gone: the next check clears it
        assert wait_for(lambda: datapath_health(status(authd))["state"] == "ready")
