"""``authd observe`` against a running daemon, and ``authd bpf ...`` on the pins (daemon up or down)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from ipaddress import ip_network
from pathlib import Path
from typing import Any

import pytest

from authd.datapath.layout import IDENTITY_ANY, AuthType, Direction
from authd.datapath.loader import attached_prog_ids
from authd.datapath.maps import AuthKey, IpcacheEntry, PinnedMaps, PolicyKey
from tests.privileged.daemon import Authd
from tests.privileged.topology import A4, B4, Topology

pytestmark = pytest.mark.privileged

A, B = 300, 400


def authd_cli(*args: str, netns: Path | None = None) -> subprocess.CompletedProcess[str]:
    prefix = ["nsenter", f"--net={netns}"] if netns else []
    return subprocess.run(
        [*prefix, sys.executable, "-m", "authd", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def send_udp(topo: Topology, port: int, count: int = 3) -> None:
    sock = topo.run(topo.a, lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
    with sock:
        for _ in range(count):
            sock.sendto(b"x", (B4, port))


def wait_for_flows(authd: Authd, count: int) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 5
    while True:
        result = authd_cli("observe", "-o", "json", "--last", "100", "--config", str(authd.config))
        assert result.returncode == 0, result.stderr
        flows = [json.loads(line)["flow"] for line in result.stdout.splitlines()]
        if len(flows) >= count or time.monotonic() > deadline:
            return flows
        time.sleep(0.05)


@pytest.fixture
def running(topology: Topology, authd: Authd, pin_dir: Path) -> Authd:
    """authd on the node; B requires authentication from anyone."""
    authd.start()
    with PinnedMaps(pin_dir) as maps:
        maps.ipcache.update_many(
            {ip_network(f"{A4}/32"): IpcacheEntry(A, 0), ip_network(f"{B4}/32"): IpcacheEntry(B, 0)}
        )
        maps.policy.update_many({PolicyKey(B, IDENTITY_ANY, Direction.INGRESS): AuthType.SPIRE})
    send_udp(topology, 7000)  # denied
    return authd


def test_observe_prints_filters_and_follows(topology: Topology, running: Authd, pin_dir: Path) -> None:
    config = str(running.config)
    flows = wait_for_flows(running, 2)
    denied = [f for f in flows if f["verdict"] == "DROPPED"]
    assert denied
    assert denied[0]["drop_reason_desc"] == "AUTH_REQUIRED"
    assert denied[0]["IP"]["source"] == A4
    assert (denied[0]["source"]["identity"], denied[0]["source"].get("labels", [])) == (
        A,
        ["authd:node=node-a"],
    )

    text = authd_cli("observe", "--verdict", "DROPPED", "--print-node-name", "--config", config)
    assert text.returncode == 0, text.stderr
    # The workloads' own link-local IPv6 chatter (MLD reports) is denied too: only B's flow is asked for.
    (line,) = [line for line in text.stdout.splitlines() if f" {B4}:" in line]
    assert f" [node-a]: {A4}:" in line
    assert f"<> {B4}:7000 (ID:400) Authentication required DROPPED (UDP; Auth: SPIRE)" in line
    assert authd_cli("observe", "--verdict", "denied", "--config", config).stdout == text.stdout.replace(
        " [node-a]", ""
    )
    assert authd_cli("observe", "--to-port", "7001", "--config", config).stdout == ""

    command = ["observe", "--follow", "-o", "jsonpb", "--identity", "400", "--traffic-direction", "ingress"]
    follow = subprocess.Popen(
        [sys.executable, "-m", "authd", *command, "--config", config], stdout=subprocess.PIPE, text=True
    )
    try:
        time.sleep(0.5)
        with PinnedMaps(pin_dir) as maps:
            maps.auth.update_many({AuthKey(B, A, 0): datetime.now(UTC) + timedelta(minutes=5)})
        send_udp(topology, 7000)
        assert follow.stdout is not None
        followed = json.loads(follow.stdout.readline())["flow"]
        assert (followed["verdict"], followed["traffic_direction"]) == ("FORWARDED", "INGRESS")
    finally:
        follow.kill()
        follow.communicate()


def test_bpf_commands_with_the_daemon_up_and_down(topology: Topology, running: Authd, pin_dir: Path) -> None:
    config = str(running.config)
    with PinnedMaps(pin_dir) as maps:
        maps.auth.update_many({AuthKey(B, A, 0): datetime.now(UTC) + timedelta(minutes=5)})
    send_udp(topology, 7001)
    listed = authd_cli("bpf", "auth", "list", "--json", "--config", config)
    assert next(json.loads(row) for row in listed.stdout.splitlines())["remote"] == A
    assert "ANY" in authd_cli("bpf", "policy", "list", "--config", config).stdout
    assert f"{B4}/32" in authd_cli("bpf", "ipcache", "list", "--config", config).stdout
    counters = authd_cli("bpf", "counters", "--json", "--config", config)
    values = {row["counter"]: row["value"] for row in map(json.loads, counters.stdout.splitlines())}
    assert values["denied_auth_required"] >= 3
    assert values["allowed_auth"] >= 1  # the first datagram; the rest pass as an established flow
    assert values["allowed_auth"] + values["established"] >= 3

    running.stop()  # the bpf commands work with the daemon down
    assert authd_cli("bpf", "auth", "flush", "--config", config).stdout.strip() == "deleted 1 auth entries"
    unloaded = authd_cli("bpf", "unload", "--config", config, netns=topology.path(topology.node))
    assert unloaded.returncode == 0, unloaded.stderr
    assert f"detached from 2 interfaces: adp{topology.tag}a, adp{topology.tag}b" in unloaded.stdout
    # Two tcx links per interface, four programs, eleven maps.
    assert "removed 20 pins" in unloaded.stdout
    assert not pin_dir.exists()
    for link in (topology.link_a, topology.link_b):
        index = topology.ifindex(link)
        assert topology.run(topology.node, lambda: attached_prog_ids(index)) == (None, None)  # noqa: B023

    missing = authd_cli("bpf", "auth", "list", "--config", config)
    assert missing.returncode == 1
    assert f"nothing pinned at {pin_dir}/auth" in missing.stderr
    again = authd_cli("bpf", "unload", "--config", config, netns=topology.path(topology.node))
    assert again.stdout.startswith("nothing to unload")
