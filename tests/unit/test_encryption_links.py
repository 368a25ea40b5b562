from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Mapping
from itertools import count

import pytest

from authd.config.schema import IpNetwork
from authd.encryption.device import PeerStatus
from authd.encryption.handover import Handover
from authd.encryption.interfaces import Interfaces
from authd.encryption.keys import KeyPair
from authd.encryption.links import (
    KEEPALIVE,
    RETIRE_TIMEOUT,
    Announced,
    Generation,
    Generations,
    Link,
    Plan,
    Remote,
    interface_name,
    plan,
    port,
    retirement,
)
from authd.errors import EncryptionError
from tests.fakes.wireguard import FakeDevice

BASE = 51820
PSK = b"\x11" * 32
KEYS = {(node, number): KeyPair.generate() for node in ("a", "b", "c") for number in range(1, 6)}
ADDRESS = {"a": "192.0.2.1", "b": "192.0.2.2", "c": "192.0.2.3"}
PREFIX = {"a": "10.1.0.0/24", "b": "10.2.0.0/24", "c": "10.3.0.0/24"}


def generation(node: str, number: int) -> Generation:
    return Generation(number, KEYS[node, number].public)


def remote(node: str, *numbers: int, sends_to: int | None = None) -> Remote:
    """``node`` announcing ``numbers`` (current first, then the one it retires)."""
    current, *previous = numbers
    announced = Announced(
        generation(node, current),
        generation(node, previous[0]) if previous else None,
        BASE,
        PSK,
        sends_to,
    )
    return Remote(node, ipaddress.ip_address(ADDRESS[node]), (ipaddress.ip_network(PREFIX[node]),), announced)


def peers_by_slot(made: Plan, node: str) -> dict[tuple[int, int], int]:
    """Which generation of ``node`` each interface holds a peer of."""
    found = {}
    for slot, links in made.links.items():
        for link in links.values():
            if link.node == node:
                assert slot not in found  # one peer per remote node per interface
                found[slot] = link.remote
    return found


def test_steady_state_is_two_interfaces_and_one_link_per_remote_node() -> None:
    made = plan({3}, [remote("b", 4)], handshaken=set())
    assert made.interfaces == {(1, 0): 3, (1, 1): 3}
    assert peers_by_slot(made, "b") == {(1, 0): 4}
    (peer,) = made.peers[1, 0]
    assert made.peers[1, 1] == ()
    assert peer.public_key == KEYS["b", 4].public
    assert peer.endpoint == (ipaddress.ip_address("192.0.2.2"), port(BASE, (0, 1)))  # b's (4 % 2, 3 % 2)
    assert peer.keepalive == KEEPALIVE  # no handshake yet: the device starts one at once
    assert made.sending == {"b": Link(3, "b", 4)}
    assert made.routes == {ipaddress.ip_network("10.2.0.0/24"): (1, 0)}
    handshaken = plan({3}, [remote("b", 4)], handshaken={Link(3, "b", 4)})
    assert handshaken.peers[1, 0][0].keepalive == 0


def test_both_ends_of_every_link_name_each_others_interface() -> None:
    a_side = plan({1, 2}, [remote("b", 5, 4)], handshaken=set())
    b_side = plan({4, 5}, [remote("a", 2, 1)], handshaken=set())
    for slot, links in a_side.links.items():
        for key, link in links.items():
            spec = next(s for s in a_side.peers[slot] if s.public_key == key)
            far = (link.remote % 2, link.own % 2)
            assert b_side.links[far][KEYS["a", link.own].public] == Link(link.remote, "a", link.own)
            assert spec.endpoint[1] == port(BASE, far)
    assert {port(BASE, slot) for slot in a_side.interfaces} == {BASE, BASE + 1, BASE + 2, BASE + 3}


def test_an_own_rotation_moves_the_route_only_after_the_new_link_handshook() -> None:
    b = remote("b", 1)
    before = plan({1, 2}, [b], handshaken={Link(1, "b", 1)})
    assert len(before.interfaces) == 4
    assert peers_by_slot(before, "b") == {(1, 1): 1, (0, 1): 1}
    assert before.sending["b"] == Link(1, "b", 1)
    assert before.routes == {ipaddress.ip_network("10.2.0.0/24"): (1, 1)}
    after = plan({1, 2}, [b], handshaken={Link(1, "b", 1), Link(2, "b", 1)})
    assert after.sending["b"] == Link(2, "b", 1)
    assert after.routes == {ipaddress.ip_network("10.2.0.0/24"): (0, 1)}


def test_a_remote_rotation_gives_its_two_generations_two_interfaces_and_prefers_the_newer() -> None:
    b = remote("b", 2, 1)
    old = plan({1}, [b], handshaken={Link(1, "b", 1)})
    assert peers_by_slot(old, "b") == {(1, 0): 2, (1, 1): 1}
    assert old.sending["b"] == Link(1, "b", 1)
    assert {s.keepalive for s in old.peers[1, 0]} == {KEEPALIVE}
    new = plan({1}, [b], handshaken={Link(1, "b", 1), Link(1, "b", 2)})
    assert new.sending["b"] == Link(1, "b", 2)


def test_concurrent_rotations_use_all_four_interfaces_without_conflicting_prefixes() -> None:
    b = remote("b", 3, 2)
    made = plan({1, 2}, [b, remote("c", 1)], handshaken={Link(1, "b", 2), Link(2, "b", 2)})
    assert peers_by_slot(made, "b") == {(1, 1): 3, (1, 0): 2, (0, 1): 3, (0, 0): 2}
    for specs in made.peers.values():
        prefixes = [prefix for spec in specs for prefix in spec.allowed_ips]
        assert len(prefixes) == len(set(prefixes))  # AllowedIPs never conflict on one interface
    assert made.sending["b"] == Link(2, "b", 2)  # the newest link that handshook
    assert made.sending["c"] == Link(2, "c", 1)  # none handshook yet: the newest, which is handshaking
    everything = {Link(g, "b", h) for g in (1, 2) for h in (2, 3)}
    assert plan({1, 2}, [b], everything).sending["b"] == Link(2, "b", 3)


def test_retirement_waits_for_every_remote_node_and_for_this_nodes_own_switch() -> None:
    moved = {"b": Link(2, "b", 1), "c": Link(2, "c", 1)}
    reported = [remote("b", 1, sends_to=2), remote("c", 1, sends_to=2)]
    assert retirement({1, 2}, reported, moved, waited=0.1) == "done"
    silent = [remote("b", 1, sends_to=2), remote("c", 1, sends_to=1)]
    assert retirement({1, 2}, silent, moved, waited=0.1) == "wait"
    not_yet = {"b": Link(1, "b", 1), "c": Link(2, "c", 1)}
    assert retirement({1, 2}, reported, not_yet, waited=0.1) == "wait"
    assert retirement({1, 2}, silent, moved, waited=RETIRE_TIMEOUT) == "forced"
    assert retirement({2}, silent, moved, waited=0.0) == "done"  # nothing to retire


def test_generations_that_are_not_consecutive_are_refused() -> None:
    with pytest.raises(EncryptionError, match="retiring beside"):
        Announced(generation("b", 3), generation("b", 1), BASE, PSK)
    with pytest.raises(EncryptionError, match="not one or two consecutive"):
        plan({1, 3}, [], set())
    with pytest.raises(EncryptionError, match="not one or two consecutive"):
        plan(set(), [], set())


def test_interface_names_carry_the_slot_and_fit_linux() -> None:
    assert interface_name("authd-wg", (1, 0)) == "authd-wg10"
    with pytest.raises(EncryptionError, match="longer than 15"):
        interface_name("authd-wireguard", (0, 0))


def test_a_node_rotates_one_generation_at_a_time() -> None:
    generations = Generations(1, KEYS["a", 1])
    assert generations.announced() == (generation("a", 1), None)
    assert generations.begin(KEYS["a", 2], now=5.0) == 2
    assert generations.announced() == (generation("a", 2), generation("a", 1))
    with pytest.raises(EncryptionError, match="already running"):
        generations.begin(KEYS["a", 3], now=6.0)
    assert generations.retire() == 1
    assert (generations.current, generations.rotating_since) == (2, None)
    with pytest.raises(EncryptionError, match="no rotation"):
        generations.retire()


# ------------------------------------------------------------- applying plans: fake devices, one log


class Devices:
    """Fake interfaces opened by name; every configure, route move and close in one log.

    A peer that handshook keeps its handshake when it is configured again, as on a real device.
    """

    def __init__(self) -> None:
        self.log: list[str] = []
        self.shook: set[str] = set()
        self.open: dict[str, FakeDevice] = {}
        self._index = count(10)

    def opener(self, name: str) -> FakeDevice:
        device = FakeDevice(interface=name, ifindex=next(self._index))
        original = device.configure
        devices = self

        def configure(**kwargs: object) -> None:
            devices.log.append(f"{name} {' '.join(sorted(k for k, v in kwargs.items() if v))}")
            original(**kwargs)  # type: ignore[arg-type]
            if name in devices.shook:
                devices.handshake(name)

        device.configure = configure  # type: ignore[method-assign]
        self.open[name] = device
        return device

    def routes(self, wanted: Mapping[IpNetwork, int]) -> None:
        names = {device.ifindex: name for name, device in self.open.items()}
        self.log.append("routes " + " ".join(f"{p}>{names[i]}" for p, i in sorted(wanted.items())))

    def handshake(self, name: str) -> None:
        self.shook.add(name)
        device = self.open[name]
        device.peers = {k: dataclasses.replace(p, last_handshake=1.0) for k, p in device.peers.items()}


def test_a_rotation_opens_first_moves_routes_next_and_removes_last() -> None:
    devices = Devices()
    clock = iter(float(t) for t in range(100))
    interfaces = Interfaces("wg", BASE, devices.opener, routes=devices.routes, tune=devices.log.append)
    handover = Handover(interfaces, Generations(1, KEYS["a", 1]), lambda: next(clock))
    b = remote("b", 1)
    handover.step([b])
    devices.handshake("wg11")
    handover.step([b])
    devices.log.clear()
    handover.rotate(KEYS["a", 2])
    handover.step([b])  # the new generation's interfaces, their peer with a keepalive; routes unchanged
    assert devices.log == ["wg00", "wg00 listen_port private_key", "wg01", "wg01 listen_port private_key",
                           "wg01 peers"]  # fmt: skip
    assert devices.open["wg01"].peers[KEYS["b", 1].public].endpoint == f"192.0.2.2:{BASE + 2}"
    devices.log.clear()
    devices.handshake("wg01")
    step = handover.step([b])  # handshook: keepalive off, the route moves; b has not reported yet
    assert step.retired is None
    assert devices.log == ["wg01 peers", "routes 10.2.0.0/24>wg01"]
    devices.log.clear()
    step = handover.step([remote("b", 1, sends_to=2)])
    assert step.retired == "done"
    assert devices.log == []  # the older interfaces go: nothing else changes
    assert sorted(devices.open[n].closed for n in ("wg10", "wg11", "wg00", "wg01")) == [
        False,
        False,
        True,
        True,
    ]
    assert sorted(interfaces.backends) == [(0, 0), (0, 1)]
    assert handover.generations.announced() == (generation("a", 2), None)


def test_a_remote_generation_that_is_retired_loses_its_peer_after_the_route_moved() -> None:
    devices = Devices()
    interfaces = Interfaces("wg", BASE, devices.opener, routes=devices.routes, tune=devices.log.append)
    handover = Handover(interfaces, Generations(1, KEYS["a", 1]), lambda: 0.0)
    handover.step([remote("b", 2, 1)])
    devices.handshake("wg11")
    handover.step([remote("b", 2, 1)])
    devices.handshake("wg10")
    devices.log.clear()
    handover.step([remote("b", 2)])  # b retired generation 1 before this node saw its new link's handshake
    assert devices.log == ["wg10 peers", "routes 10.2.0.0/24>wg10", "wg11 remove"]
    assert devices.open["wg11"].peers == {}


def test_a_status_peer_outside_the_last_plan_is_no_link() -> None:
    devices = Devices()
    interfaces = Interfaces("wg", BASE, devices.opener, routes=devices.routes, tune=devices.log.append)
    handover = Handover(interfaces, Generations(1, KEYS["a", 1]), lambda: 0.0)
    handover.step([remote("b", 1)])
    stranger = KeyPair.generate().public
    devices.open["wg10"].peers[stranger] = PeerStatus(stranger, None, (), 1.0, 0, 0, has_preshared_key=True)
    devices.handshake("wg11")
    assert interfaces.handshaken(interfaces.status()) == {Link(1, "b", 1)}
