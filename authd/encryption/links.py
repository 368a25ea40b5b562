"""Which WireGuard interfaces, peers and routes a node needs while node keys rotate: pure planning.

WireGuard names a peer by its static key, holds one private key per interface, and gives each prefix
to one peer of an interface. So a node's key generations live on interfaces of their own, chosen by
parity: the node's interface ``(p, q)`` holds the private key of its own generation of parity ``p``,
and the peers of the remote nodes' generations of parity ``q``. The link between this node's
generation ``g`` and node M's generation ``h`` is this node's interface ``(g % 2, h % 2)`` and M's
interface ``(h % 2, g % 2)``: both ends know it without asking, and an interface never holds two
generations of one node, so AllowedIPs never conflict. A node keeps at most two generations of its
own (the current one and, while it rotates, the one it retires), so it has two interfaces in steady
state and four while it rotates; each remote node announces at most two as well.

Traffic to M goes through the newest link that has completed a handshake, preferring this node's
newest generation, then M's; a link without a handshake gets a persistent keepalive, which makes
the device handshake at once, so a route moves only onto a link that both ends already hold, and no
packet waits for a handshake. (Only before any link to M has handshaken, a node met for the first
time, does its traffic go to the newest link, where WireGuard holds it until the handshake.)

A generation is retired when every remote node that has links reports sending to the newer one, and
this node sends to every remote node from the newer one, or when the rotation has waited
:data:`RETIRE_TIMEOUT` seconds (a forced retirement).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

from authd.config.schema import IpAddress, IpNetwork
from authd.encryption.device import PeerSpec
from authd.encryption.keys import KeyPair, PublicKey
from authd.errors import EncryptionError

Slot = tuple[int, int]
"""An interface: (parity of this node's generation it holds, parity of the remote generations)."""
SLOTS: tuple[Slot, ...] = ((0, 0), (0, 1), (1, 0), (1, 1))
MAX_INTERFACE = 15
"""Linux's limit on an interface name (IFNAMSIZ less the terminating zero)."""
KEEPALIVE = 1
"""Persistent keepalive, seconds, of a link until its first handshake."""
RETIRE_TIMEOUT = 30.0
"""Seconds a rotation waits for every peer to move to the new generation before retiring the old."""
Retirement = Literal["wait", "done", "forced"]


@dataclass(frozen=True, slots=True)
class Generation:
    """One generation of a node key: its number (growing by one per rotation) and its public key."""

    number: int
    public_key: PublicKey


@dataclass(frozen=True, slots=True)
class Announced:
    """What a remote node's channel said: its live generations, ports, the pair's PSK, what it sends to."""

    current: Generation
    previous: Generation | None
    """The generation it retires, while it rotates (``current.number - 1``)."""
    base_port: int
    preshared_key: bytes
    sends_to: int | None = None
    """The generation of this node it routes this node's prefixes to; None before it said."""

    def __post_init__(self) -> None:
        """Refuse a previous generation that is not the one just before the current one."""
        previous = self.previous
        if previous is not None and previous.number != self.current.number - 1:
            raise EncryptionError(
                f"encryption: generation {previous.number} retiring beside {self.current.number}"
            )

    @property
    def generations(self) -> tuple[Generation, ...]:
        """The live generations, newest first."""
        return (self.current,) if self.previous is None else (self.current, self.previous)


@dataclass(frozen=True, slots=True)
class Remote:
    """A remote node in cluster state with the keys its channel announced."""

    name: str
    address: IpAddress
    prefixes: tuple[IpNetwork, ...]
    announced: Announced


@dataclass(frozen=True, slots=True)
class Link:
    """This node's generation ``own`` with node ``node``'s generation ``remote``."""

    own: int
    node: str
    remote: int

    @property
    def slot(self) -> Slot:
        """This node's interface that carries the link."""
        return (self.own % 2, self.remote % 2)


@dataclass(frozen=True, slots=True)
class Plan:
    """Interfaces, their peers, and where each remote node's prefixes are routed."""

    interfaces: Mapping[Slot, int]
    """Each interface and the generation of this node whose private key it holds."""
    peers: Mapping[Slot, tuple[PeerSpec, ...]]
    links: Mapping[Slot, Mapping[PublicKey, Link]]
    """The link of each peer of each interface, by the peer's public key."""
    sending: Mapping[str, Link]
    """The link each remote node's prefixes are routed through."""
    routes: Mapping[IpNetwork, Slot]


def port(base_port: int, slot: Slot) -> int:
    """The UDP port of interface ``slot`` of a node whose first port is ``base_port``."""
    return base_port + 2 * slot[0] + slot[1]


def interface_name(base: str, slot: Slot) -> str:
    """The name of interface ``slot``: ``base`` and the slot's two parities."""
    name = f"{base}{slot[0]}{slot[1]}"
    if len(name) > MAX_INTERFACE:
        raise EncryptionError(f"encryption: interface name {name!r} is longer than {MAX_INTERFACE}")
    return name


def _check_own(own: Collection[int]) -> int:
    """The newest of ``own``; refuse anything but one generation or two consecutive ones."""
    if not own or len(own) > 2 or (len(own) == 2 and max(own) - min(own) != 1):
        raise EncryptionError(f"encryption: live generations {sorted(own)} are not one or two consecutive")
    return max(own)


def plan(own: Collection[int], remotes: Iterable[Remote], handshaken: Collection[Link]) -> Plan:
    """The interfaces, peers and routes of a node whose live generations are ``own``.

    ``handshaken`` are the links whose peer the device reports a completed handshake for.
    """
    _check_own(own)
    interfaces = {(g % 2, q): g for g in own for q in (0, 1)}
    peers: dict[Slot, list[PeerSpec]] = {slot: [] for slot in interfaces}
    links: dict[Slot, dict[PublicKey, Link]] = {slot: {} for slot in interfaces}
    sending: dict[str, Link] = {}
    routes: dict[IpNetwork, Slot] = {}
    for remote in remotes:
        announced = remote.announced
        candidates = []
        for g in sorted(own, reverse=True):
            for generation in announced.generations:
                link = Link(g, remote.name, generation.number)
                candidates.append(link)
                peers[link.slot].append(
                    PeerSpec(
                        public_key=generation.public_key,
                        preshared_key=announced.preshared_key,
                        endpoint=(remote.address, port(announced.base_port, (link.remote % 2, g % 2))),
                        allowed_ips=remote.prefixes,
                        keepalive=0 if link in handshaken else KEEPALIVE,
                    )
                )
                links[link.slot][generation.public_key] = link
        chosen = next((link for link in candidates if link in handshaken), candidates[0])
        sending[remote.name] = chosen
        routes.update(dict.fromkeys(remote.prefixes, chosen.slot))
    return Plan(
        interfaces=interfaces,
        peers={slot: tuple(specs) for slot, specs in peers.items()},
        links=links,
        sending=sending,
        routes=routes,
    )


def retirement(
    own: Collection[int], remotes: Iterable[Remote], sending: Mapping[str, Link], waited: float
) -> Retirement:
    """Whether this node's older generation can go, after its rotation has ``waited`` seconds.

    ``done`` once every remote node reports sending to the newest generation and this node sends to
    every one from it; ``forced`` when that has not happened within :data:`RETIRE_TIMEOUT`.
    """
    newest = _check_own(own)
    if len(own) == 1:
        return "done"
    moved = all(
        remote.announced.sends_to == newest and remote.name in sending and sending[remote.name].own == newest
        for remote in remotes
    )
    if moved:
        return "done"
    return "forced" if waited >= RETIRE_TIMEOUT else "wait"


class Generations:
    """This node's live key generations (one, or two while it rotates) and when its rotation began."""

    def __init__(self, number: int, pair: KeyPair) -> None:
        """Start with generation ``number``, whose key is ``pair``."""
        self.pairs: dict[int, KeyPair] = {number: pair}
        self.rotating_since: float | None = None

    @property
    def current(self) -> int:
        """The newest generation's number."""
        return max(self.pairs)

    def begin(self, pair: KeyPair, now: float) -> int:
        """Add the next generation, with key ``pair``; its number. Refused while a rotation runs."""
        if self.rotating_since is not None:
            raise EncryptionError("encryption: a rotation of the node key is already running")
        number = self.current + 1
        self.pairs[number] = pair
        self.rotating_since = now
        return number

    def retire(self) -> int:
        """Drop the older generation of a rotation; the number dropped."""
        if self.rotating_since is None:
            raise EncryptionError("encryption: no rotation of the node key is running")
        older = min(self.pairs)
        del self.pairs[older]
        self.rotating_since = None
        return older

    def announced(self) -> tuple[Generation, Generation | None]:
        """The current generation and the one retiring, as the channels announce them."""
        current = Generation(self.current, self.pairs[self.current].public)
        older = min(self.pairs)
        previous = Generation(older, self.pairs[older].public) if older != self.current else None
        return current, previous
