"""A hand-written WireGuard backend: a device in memory that records what it was told."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

from authd.encryption.device import DeviceStatus, PeerSpec, PeerStatus
from authd.encryption.keys import KeyPair, PublicKey


@dataclass
class FakeDevice:
    """One interface: its key, port and peers (as a backend reports them); every configure call."""

    interface: str = "authd-wg0"
    ifindex: int = 7
    name: Literal["kernel", "userspace"] = "userspace"
    private_key: KeyPair | None = None
    listen_port: int = 0
    peers: dict[PublicKey, PeerStatus] = field(default_factory=dict)
    psks: dict[PublicKey, bytes] = field(default_factory=dict)
    keepalives: dict[PublicKey, int] = field(default_factory=dict)
    calls: list[str] = field(default_factory=list)
    closed: bool = False

    def configure(
        self,
        *,
        private_key: KeyPair | None = None,
        listen_port: int | None = None,
        peers: Iterable[PeerSpec] = (),
        remove: Iterable[PublicKey] = (),
    ) -> None:
        if private_key is not None:
            self.private_key = private_key
            self.calls.append("private-key")
        if listen_port is not None:
            self.listen_port = listen_port
        for peer in peers:
            known = self.peers.get(peer.public_key)  # a peer set again keeps its sessions
            self.peers[peer.public_key] = PeerStatus(
                peer.public_key,
                peer.endpoint_text(),
                peer.allowed_ips,
                known.last_handshake if known is not None else None,
                0,
                0,
                has_preshared_key=True,
            )
            self.psks[peer.public_key] = peer.preshared_key
            self.keepalives[peer.public_key] = peer.keepalive
            self.calls.append(f"peer {peer.endpoint_text()}")
        for key in remove:
            self.peers.pop(key, None)
            self.calls.append("remove")

    def status(self) -> DeviceStatus:
        public = self.private_key.public if self.private_key is not None else None
        return DeviceStatus(public, self.listen_port, tuple(self.peers.values()))

    def close(self, *, remove: bool) -> None:
        self.closed = True
        del remove
