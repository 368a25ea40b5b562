"""The daemon's datapath jobs: links that appear later get the programs; SIGHUP applies live settings."""

from __future__ import annotations

import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from authd.datapath.layout import FlowLevel
from authd.datapath.loader import attached_prog_ids
from authd.datapath.maps import PinnedMaps
from tests.privileged.daemon import Authd
from tests.privileged.topology import Topology, sh

pytestmark = pytest.mark.privileged


def wait_until(check: Callable[[], bool], timeout: float = 5) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.02)
    return False


def test_links_that_appear_later_are_attached(topology: Topology, authd: Authd) -> None:
    authd.start()
    new_link = f"adp{topology.tag}c"
    sh("ip", "-n", topology.node, "link", "add", new_link, "type", "veth", "peer", "name", "other0")

    def attached() -> bool:
        index = socket.if_nametoindex(new_link)
        return None not in attached_prog_ids(index)

    assert wait_until(lambda: topology.run(topology.node, attached))
    other = topology.run(topology.node, lambda: attached_prog_ids(socket.if_nametoindex("other0")))
    assert other == (None, None)  # not matching the pattern


def test_pins_of_removed_links_are_removed(topology: Topology, authd: Authd, pin_dir: Path) -> None:
    authd.start()
    new_link = f"adp{topology.tag}c"
    sh("ip", "-n", topology.node, "link", "add", new_link, "type", "veth", "peer", "name", "other0")
    links = pin_dir / "links"
    before = set(links.iterdir())
    assert wait_until(lambda: len(set(links.iterdir()) - before) == 2)  # its two hooks' links
    sh("ip", "-n", topology.node, "link", "del", new_link)
    assert wait_until(lambda: set(links.iterdir()) == before)  # the daemon saw the link go


def test_sighup_applies_flow_level_and_interval(authd: Authd, pin_dir: Path) -> None:
    authd.start()
    with PinnedMaps(pin_dir) as maps:
        assert maps.config.read().flow_level is FlowLevel.FIRST
        text = authd.config.read_text()
        authd.config.write_text(
            text.replace(
                "[datapath]\n", '[datapath]\nflow_events = "denied"\nauth_required_interval = "5s"\n'
            )
        )
        assert authd.proc is not None
        authd.proc.send_signal(signal.SIGHUP)
        assert wait_until(lambda: maps.config.read().flow_level is FlowLevel.DENIED)
        assert maps.config.read().auth_required_interval_ns == 5_000_000_000
    authd.stop()
    assert "some changes need a restart" not in authd.outputs[0]
