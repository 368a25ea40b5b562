"""What a WireGuard device is told and what it reports, independent of the backend that holds it."""

from __future__ import annotations

from dataclasses import dataclass

from authd.config.schema import IpAddress, IpNetwork
from authd.encryption.keys import PublicKey


@dataclass(frozen=True, slots=True)
class PeerSpec:
    """One peer as authd wants it: its key, PSK, underlay endpoint and the inner sources it may send."""

    public_key: PublicKey
    preshared_key: bytes
    endpoint: tuple[IpAddress, int]
    allowed_ips: tuple[IpNetwork, ...]
    keepalive: int = 0
    """Persistent keepalive, seconds (0: off). Setting it sends a keepalive at once, which starts a
    handshake: the peer side of a key rotation uses that to meet the rotating node's new key at once."""

    def endpoint_text(self) -> str:
        """``ip:port``, IPv6 in brackets, as both UAPI and ``wg`` write it."""
        address, port = self.endpoint
        return f"[{address}]:{port}" if address.version == 6 else f"{address}:{port}"


@dataclass(frozen=True, slots=True)
class PeerStatus:
    """One peer as the device reports it."""

    public_key: PublicKey
    endpoint: str | None
    allowed_ips: tuple[IpNetwork, ...]
    last_handshake: float | None
    """Unix time of the last completed handshake; None before the first."""
    rx_bytes: int
    tx_bytes: int
    has_preshared_key: bool


@dataclass(frozen=True, slots=True)
class DeviceStatus:
    """The device as it reports itself."""

    public_key: PublicKey | None
    listen_port: int
    peers: tuple[PeerStatus, ...]

    def peer(self, key: PublicKey) -> PeerStatus | None:
        """The peer with public key ``key``, if the device has it."""
        return next((peer for peer in self.peers if peer.public_key == key), None)
