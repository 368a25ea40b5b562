"""The kernel backend: a ``wireguard`` link, made with ``ip`` and configured with ``wg`` (wireguard-tools).

Both run as child processes, born in the calling thread's network namespace: call it from the namespace
that holds the link. Keys reach ``wg`` on its stdin, never on its command line; one ``wg set`` per peer,
since each carries its own preshared key.
"""

from __future__ import annotations

import base64
import ipaddress
import socket
import subprocess
from collections.abc import Iterable, Sequence
from typing import Literal

import structlog

from authd.encryption.device import DeviceStatus, PeerSpec, PeerStatus
from authd.encryption.keys import KeyPair, PublicKey
from authd.errors import EncryptionError

log = structlog.get_logger(__name__)

_PROBE = "authd-wgprobe"
_NO_KEY = "(none)"
_STDIN = "/proc/self/fd/0"  # wg reads key files by path; /dev/stdin need not exist (a bare devtmpfs)


def _run(argv: Sequence[str], *, secret: bytes = b"", what: str) -> str:
    try:
        done = subprocess.run(argv, input=secret, capture_output=True, check=False, timeout=10)  # noqa: S603 - fixed tools
    except (OSError, subprocess.TimeoutExpired) as err:
        raise EncryptionError(f"encryption: {what}: {err}") from err
    if done.returncode:
        raise EncryptionError(f"encryption: {what}: {done.stderr.decode(errors='replace').strip()}")
    return done.stdout.decode()


def available() -> bool:
    """Whether this kernel can create a wireguard link (the module is built in or loads on demand)."""
    try:
        _run(["ip", "link", "add", _PROBE, "type", "wireguard"], what="probe")
    except EncryptionError:
        return False
    _run(["ip", "link", "del", _PROBE], what="probe")
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
            socket.if_nametoindex(interface)
        except OSError:
            _run(["ip", "link", "add", interface, "type", "wireguard"], what=f"cannot create {interface}")
            log.info("wireguard link created", interface=interface)
        _run(["ip", "link", "set", interface, "up"], what=f"cannot bring {interface} up")
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
        what = f"cannot configure {self.interface}"
        wg = ["wg", "set", self.interface]
        if listen_port is not None or private_key is not None:
            argv = [*wg, *(("listen-port", str(listen_port)) if listen_port is not None else ())]
            secret = b""
            if private_key is not None:
                argv += ["private-key", _STDIN]
                secret = base64.b64encode(private_key.private_raw())
            _run(argv, secret=secret, what=what)
        for peer in peers:
            allowed = ",".join(str(prefix) for prefix in peer.allowed_ips)
            argv = [*wg, "peer", peer.public_key.base64(), "preshared-key", _STDIN]
            argv += ["endpoint", peer.endpoint_text(), "persistent-keepalive", str(peer.keepalive or "off")]
            argv += ["allowed-ips", allowed]  # replaces the peer's list; empty clears it
            _run(argv, secret=base64.b64encode(peer.preshared_key), what=what)
        for key in remove:
            _run([*wg, "peer", key.base64(), "remove"], what=what)

    def status(self) -> DeviceStatus:
        """The device as ``wg show <if> dump`` reports it: the device's line, then one per peer."""
        lines = _run(
            ["wg", "show", self.interface, "dump"], what=f"cannot read {self.interface}"
        ).splitlines()
        if not lines:
            raise EncryptionError(f"encryption: cannot read {self.interface}: empty dump")
        _, public, port, _ = lines[0].split("\t")
        key = None if public == _NO_KEY else PublicKey(base64.b64decode(public))
        return DeviceStatus(key, int(port), tuple(_peer(line.split("\t")) for line in lines[1:]))

    def close(self, *, remove: bool) -> None:
        """Delete the link when ``remove``; else leave it forwarding."""
        if remove:
            try:
                socket.if_nametoindex(self.interface)
            except OSError:
                return
            _run(["ip", "link", "del", self.interface], what=f"cannot delete {self.interface}")


def _peer(fields: Sequence[str]) -> PeerStatus:
    public, psk, endpoint, allowed, handshake, rx, tx, _ = fields
    return PeerStatus(
        public_key=PublicKey(base64.b64decode(public)),
        endpoint=None if endpoint == _NO_KEY else endpoint,
        allowed_ips=tuple(ipaddress.ip_network(ip) for ip in allowed.split(",") if ip != _NO_KEY),
        last_handshake=float(handshake) or None,
        rx_bytes=int(rx),
        tx_bytes=int(tx),
        has_preshared_key=psk != _NO_KEY,
    )
