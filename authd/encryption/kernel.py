"""The kernel backend: a ``wireguard`` link, configured over generic netlink (pyroute2's WireGuard).

pyroute2 sends one peer per set request, so a change to N peers is N requests; keys travel in base64.
"""

from __future__ import annotations

import base64
import contextlib
import ipaddress
import socket
from collections.abc import Iterable
from typing import Any, Literal

import structlog
from pyroute2 import IPRoute, WireGuard
from pyroute2.netlink.exceptions import NetlinkError

from authd.encryption.device import DeviceStatus, PeerSpec, PeerStatus
from authd.encryption.keys import KeyPair, PublicKey
from authd.errors import EncryptionError

log = structlog.get_logger(__name__)

_PROBE = "authd-wgprobe"


def available() -> bool:
    """Whether this kernel can create a wireguard link (the module is built in or loads on demand)."""
    with IPRoute() as ipr:
        try:
            ipr.link("add", ifname=_PROBE, kind="wireguard")
        except NetlinkError:
            return False
        ipr.link("del", index=ipr.link_lookup(ifname=_PROBE)[0])
    return True


class KernelWireGuard:
    """One kernel WireGuard link."""

    name: Literal["kernel"] = "kernel"

    def __init__(self, interface: str) -> None:
        """Wrap the existing link ``interface``."""
        self.interface = interface

    @classmethod
    def open(cls, interface: str) -> KernelWireGuard:
        """Use the link an earlier authd left (keys and sessions kept), or create it; bring it up."""
        try:
            with IPRoute() as ipr:
                if not ipr.link_lookup(ifname=interface):
                    ipr.link("add", ifname=interface, kind="wireguard")
                    log.info("wireguard link created", interface=interface)
                ipr.link("set", index=ipr.link_lookup(ifname=interface)[0], state="up")
        except NetlinkError as err:
            raise EncryptionError(f"encryption: cannot create wireguard link {interface}: {err}") from err
        return cls(interface)

    @property
    def ifindex(self) -> int:
        """The link's index."""
        try:
            return socket.if_nametoindex(self.interface)
        except OSError as err:
            raise EncryptionError(f"encryption: interface {self.interface} is gone") from err

    def configure(
        self,
        *,
        private_key: KeyPair | None = None,
        listen_port: int | None = None,
        peers: Iterable[PeerSpec] = (),
        remove: Iterable[PublicKey] = (),
    ) -> None:
        """Device settings in one request, then one request per peer."""
        try:
            with WireGuard() as wg:
                if private_key is not None or listen_port is not None:
                    secret = base64.b64encode(private_key.private_raw()).decode() if private_key else None
                    wg.set(self.interface, private_key=secret, listen_port=listen_port)
                for peer in peers:
                    address, port = peer.endpoint
                    wg.set(
                        self.interface,
                        peer={
                            "public_key": peer.public_key.base64(),
                            "preshared_key": base64.b64encode(peer.preshared_key).decode(),
                            "endpoint_addr": str(address),
                            "endpoint_port": port,
                            "persistent_keepalive": peer.keepalive,
                            "replace_allowed_ips": True,
                            "allowed_ips": [str(prefix) for prefix in peer.allowed_ips],
                        },
                    )
                for key in remove:
                    wg.set(self.interface, peer={"public_key": key.base64(), "remove": True})
        except (NetlinkError, OSError, ValueError) as err:
            raise EncryptionError(f"encryption: cannot configure {self.interface}: {err}") from err

    def status(self) -> DeviceStatus:
        """The device as the kernel reports it (a dump may span several messages)."""
        try:
            with WireGuard() as wg:
                messages = list(wg.info(self.interface))
        except (NetlinkError, OSError) as err:
            raise EncryptionError(f"encryption: cannot read {self.interface}: {err}") from err
        public: PublicKey | None = None
        port = 0
        peers: list[PeerStatus] = []
        for message in messages:
            key = message.get_attr("WGDEVICE_A_PUBLIC_KEY")
            if key is not None:
                public = PublicKey(base64.b64decode(key))
            port = message.get_attr("WGDEVICE_A_LISTEN_PORT") or port
            peers += [_peer(peer) for peer in message.get_attr("WGDEVICE_A_PEERS") or ()]
        return DeviceStatus(public, port, tuple(peers))

    def close(self, *, remove: bool) -> None:
        """Delete the link when ``remove``; else leave it forwarding."""
        if remove:
            with IPRoute() as ipr, contextlib.suppress(NetlinkError):
                for index in ipr.link_lookup(ifname=self.interface):
                    ipr.link("del", index=index)


def _peer(peer: Any) -> PeerStatus:  # noqa: ANN401 - pyroute2's nla objects are untyped
    endpoint = peer.get_attr("WGPEER_A_ENDPOINT")
    handshake = peer.get_attr("WGPEER_A_LAST_HANDSHAKE_TIME")
    seconds = (handshake["tv_sec"] + handshake["tv_nsec"] / 1e9) if handshake else 0.0
    psk = peer.get_attr("WGPEER_A_PRESHARED_KEY")
    allowed = [ipaddress.ip_network(ip["addr"]) for ip in peer.get_attr("WGPEER_A_ALLOWEDIPS") or ()]
    text = None
    if endpoint is not None:
        address = ipaddress.ip_address(endpoint["addr"])
        text = f"[{address}]:{endpoint['port']}" if address.version == 6 else f"{address}:{endpoint['port']}"
    return PeerStatus(
        public_key=PublicKey(base64.b64decode(peer.get_attr("WGPEER_A_PUBLIC_KEY"))),
        endpoint=text,
        allowed_ips=tuple(allowed),
        last_handshake=seconds or None,
        rx_bytes=peer.get_attr("WGPEER_A_RX_BYTES") or 0,
        tx_bytes=peer.get_attr("WGPEER_A_TX_BYTES") or 0,
        has_preshared_key=psk is not None and base64.b64decode(psk).strip(b"\0") != b"",
    )
