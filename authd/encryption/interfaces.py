"""This node's WireGuard interfaces, one per slot (:mod:`authd.encryption.links`), made to match a plan.

:meth:`Interfaces.apply` changes the devices in the order that keeps every packet a route and a peer:
interfaces and peers a plan adds come first, then the routes move (each replaced in place), then the
peers and interfaces it no longer has go. A packet that arrives on one of the node's interfaces while
the route back to its source uses another must not fail the kernel's reverse-path filter: each interface
gets ``rp_filter = 0`` (WireGuard's AllowedIPs and the datapath's tunnel binding check sources there).
Loose mode (2) is not enough: an interface without an IPv4 address fails it for any source that is not
routed through it. The kernel applies the higher of ``all`` and the interface's value, so a host whose
``net.ipv4.conf.all.rp_filter`` is not 0 drops those packets for the few milliseconds between the two
ends' route switches; :func:`open_reverse_path` logs a warning then.

Calls block (netlink, UAPI, processes): a caller on an event loop runs them in a worker thread, one at
a time. The encryption job does not use this yet (it runs one interface, :mod:`authd.encryption.tunnel`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import structlog

from authd.config.schema import IpNetwork
from authd.encryption.backend import WireGuardBackend
from authd.encryption.device import DeviceStatus, PeerSpec
from authd.encryption.keys import KeyPair, PublicKey
from authd.encryption.links import Link, Plan, Slot, interface_name, port
from authd.encryption.routes import move_routes
from authd.errors import EncryptionError

log = structlog.get_logger(__name__)

OpenInterface = Callable[[str], WireGuardBackend]
MoveRoutes = Callable[[Mapping[IpNetwork, int]], None]
_CONF = Path("/proc/sys/net/ipv4/conf")


def open_reverse_path(interface: str) -> None:
    """Turn off the reverse-path filter on ``interface``; warn if ``all`` keeps one (the higher applies)."""
    try:
        path = _CONF / interface / "rp_filter"
        if path.read_text().strip() != "0":
            path.write_text("0")
        every = (_CONF / "all" / "rp_filter").read_text().strip()
    except OSError as err:
        raise EncryptionError(f"encryption: cannot set rp_filter of {interface}: {err}") from err
    if every != "0":
        log.warning("reverse-path filter on for all interfaces", rp_filter=every, interface=interface)


class Interfaces:
    """The node's WireGuard interfaces by slot, with the peers and routes authd gave them."""

    def __init__(
        self,
        base: str,
        base_port: int,
        opener: OpenInterface,
        *,
        routes: MoveRoutes = move_routes,
        tune: Callable[[str], None] = open_reverse_path,
    ) -> None:
        """Nothing is opened before :meth:`apply`."""
        self._base, self._base_port = base, base_port
        self._opener, self._routes, self._tune = opener, routes, tune
        self.backends: dict[Slot, WireGuardBackend] = {}
        self._keys: dict[Slot, PublicKey] = {}
        self._applied: dict[Slot, dict[PublicKey, PeerSpec]] = {}
        self._links: Mapping[Slot, Mapping[PublicKey, Link]] = {}
        self._routed: dict[IpNetwork, int] | None = None

    def apply(self, plan: Plan, keys: Mapping[int, KeyPair]) -> None:
        """Make the interfaces, peers and routes ``plan``'s; ``keys`` holds this node's live generations."""
        for slot, generation in sorted(plan.interfaces.items()):
            self._device(slot, keys[generation])
            wanted = {spec.public_key: spec for spec in plan.peers[slot]}
            applied = self._applied.setdefault(slot, {})
            changed = [spec for key, spec in wanted.items() if applied.get(key) != spec]
            if changed:
                self.backends[slot].configure(peers=changed)
                applied.update((spec.public_key, spec) for spec in changed)
        self._links = plan.links
        routed = {prefix: self.backends[slot].ifindex for prefix, slot in plan.routes.items()}
        if routed != self._routed:
            self._routes(routed)
            self._routed = routed
        for slot, applied in self._applied.items():
            gone = set(applied) - {spec.public_key for spec in plan.peers.get(slot, ())}
            if gone and slot in plan.interfaces:
                self.backends[slot].configure(remove=gone)
                for key in gone:
                    del applied[key]
        for slot in sorted(set(self.backends) - set(plan.interfaces)):
            self.backends.pop(slot).close(remove=True)
            self._applied.pop(slot, None)
            self._keys.pop(slot, None)
            log.info("wireguard interface removed", interface=interface_name(self._base, slot))

    def _device(self, slot: Slot, pair: KeyPair) -> None:
        """Open interface ``slot`` if it is not, and give it ``pair`` and its port."""
        backend = self.backends.get(slot)
        if backend is None:
            name = interface_name(self._base, slot)
            backend = self._opener(name)
            self.backends[slot] = backend
            self._tune(name)
            log.info("wireguard interface opened", interface=name)
        if self._keys.get(slot) != pair.public:
            backend.configure(private_key=pair, listen_port=port(self._base_port, slot))
            self._keys[slot] = pair.public

    def status(self) -> dict[Slot, DeviceStatus]:
        """What each interface's device reports."""
        return {slot: backend.status() for slot, backend in self.backends.items()}

    def handshaken(self, status: Mapping[Slot, DeviceStatus]) -> set[Link]:
        """The links of the last plan applied whose peer has completed a handshake, per ``status``."""
        done: set[Link] = set()
        for slot, device in status.items():
            links = self._links.get(slot, {})
            for peer in device.peers:
                link = links.get(peer.public_key)
                if link is not None and peer.last_handshake is not None:
                    done.add(link)
        return done

    def close(self, *, remove: bool) -> None:
        """Let go of every interface (``remove``: delete them)."""
        for slot in sorted(self.backends):
            self.backends.pop(slot).close(remove=remove)
