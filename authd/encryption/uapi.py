"""wireguard-go's configuration protocol: ``key=value`` lines over a Unix stream socket.

A request is ``get=1`` or ``set=1`` followed by lines and an empty line; the reply is lines ending
with ``errno=<n>`` and an empty line. Keys are written in lowercase hex. In a set, ``public_key=`` opens
a peer's section and the lines after it apply to that peer.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable
from pathlib import Path

from authd.encryption.device import DeviceStatus, PeerSpec, PeerStatus
from authd.encryption.keys import KeyPair, PublicKey
from authd.errors import EncryptionError

MAX_REPLY = 4 << 20
"""A get reply for 65536 peers with a few prefixes each stays well below this."""


def set_request(
    *,
    private_key: KeyPair | None = None,
    listen_port: int | None = None,
    peers: Iterable[PeerSpec] = (),
    remove: Iterable[PublicKey] = (),
) -> bytes:
    """One ``set`` request: device settings, peers added or replaced, then peers removed."""
    lines = ["set=1"]
    if private_key is not None:
        lines.append(f"private_key={private_key.private_raw().hex()}")
    if listen_port is not None:
        lines.append(f"listen_port={listen_port}")
    for peer in peers:
        lines += [
            f"public_key={peer.public_key.hex()}",
            f"preshared_key={peer.preshared_key.hex()}",
            f"endpoint={peer.endpoint_text()}",
            f"persistent_keepalive_interval={peer.keepalive}",
            "replace_allowed_ips=true",
            *(f"allowed_ip={prefix}" for prefix in peer.allowed_ips),
        ]
    for key in remove:
        lines += [f"public_key={key.hex()}", "remove=true"]
    return ("\n".join(lines) + "\n\n").encode()


def parse_get(text: str) -> DeviceStatus:
    """The device status in a ``get`` reply; an EncryptionError for a reply that is not one."""
    device: dict[str, str] = {}
    sections: list[dict[str, list[str]]] = []
    for line in text.split("\n"):
        if not line:
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise EncryptionError(f"encryption: uapi reply line without '=': {line[:80]!r}")
        if key == "public_key":
            sections.append({})
        if sections and key != "errno":
            sections[-1].setdefault(key, []).append(value)
        else:
            device[key] = value
    if device.get("errno") != "0":
        raise EncryptionError(f"encryption: uapi get failed with errno {device.get('errno')}")
    try:
        public = (
            KeyPair.from_raw(bytes.fromhex(device["private_key"])).public if "private_key" in device else None
        )
        return DeviceStatus(public, int(device.get("listen_port", "0")), tuple(_peer(s) for s in sections))
    except ValueError as err:
        raise EncryptionError(f"encryption: bad uapi get reply: {err}") from err


def _peer(fields: dict[str, list[str]]) -> PeerStatus:
    def one(key: str, default: str = "0") -> str:
        return fields.get(key, [default])[-1]

    seconds, nanos = int(one("last_handshake_time_sec")), int(one("last_handshake_time_nsec"))
    return PeerStatus(
        public_key=PublicKey(bytes.fromhex(one("public_key"))),
        endpoint=fields["endpoint"][-1] if "endpoint" in fields else None,
        allowed_ips=tuple(ipaddress.ip_network(prefix) for prefix in fields.get("allowed_ip", [])),
        last_handshake=seconds + nanos / 1e9 if seconds or nanos else None,
        rx_bytes=int(one("rx_bytes")),
        tx_bytes=int(one("tx_bytes")),
        has_preshared_key=one("preshared_key").strip("0") != "",
    )


class UapiClient:
    """Requests to one wireguard-go device over its socket: one connection per request."""

    def __init__(self, path: Path, *, timeout: float = 2.0) -> None:
        """Talk to the socket at ``path``."""
        self.path = path
        self.timeout = timeout

    def _call(self, request: bytes) -> str:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(self.timeout)
                sock.connect(str(self.path))
                sock.sendall(request)
                reply = bytearray()
                while not reply.endswith(b"\n\n") and len(reply) < MAX_REPLY:
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    reply += chunk
        except OSError as err:
            raise EncryptionError(f"encryption: uapi socket {self.path}: {err}") from err
        if not reply.endswith(b"\n\n"):
            raise EncryptionError(f"encryption: uapi socket {self.path} closed mid-reply")
        return reply.decode("ascii", errors="replace")

    def set(self, request: bytes) -> None:
        """Send a set request made by :func:`set_request`; an EncryptionError unless it succeeded."""
        reply = self._call(request).strip()
        if reply != "errno=0":
            raise EncryptionError(f"encryption: uapi set refused: {reply[:80]!r}")

    def get(self) -> DeviceStatus:
        """The device's status."""
        return parse_get(self._call(b"get=1\n\n"))
