"""The one interface both WireGuard backends offer, and the choice between them at start."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Literal, Protocol

from authd.encryption import kernel, userspace
from authd.encryption.device import DeviceStatus, PeerSpec
from authd.encryption.keys import KeyPair, PublicKey

BackendName = Literal["kernel", "userspace"]


class WireGuardBackend(Protocol):
    """A WireGuard interface that authd configures: kernel WireGuard or wireguard-go."""

    interface: str

    @property
    def name(self) -> BackendName:
        """Which backend this is, as ``authd status`` reports it."""
        ...

    @property
    def ifindex(self) -> int:
        """The interface's index in this network namespace."""
        ...

    def configure(
        self,
        *,
        private_key: KeyPair | None = None,
        listen_port: int | None = None,
        peers: Iterable[PeerSpec] = (),
        remove: Iterable[PublicKey] = (),
    ) -> None:
        """Apply device settings, add or replace ``peers`` (their prefixes replaced), remove ``remove``."""
        ...

    def status(self) -> DeviceStatus:
        """What the device reports."""
        ...

    def close(self, *, remove: bool) -> None:
        """Let go of the interface; ``remove`` deletes it (else it keeps forwarding for a restarted authd)."""
        ...


def open_backend(
    choice: Literal["auto", "kernel", "userspace"], interface: str, *, wireguard_go: Path, runtime_dir: Path
) -> WireGuardBackend:
    """The backend ``choice`` names; ``auto``: kernel WireGuard if this kernel can create its link."""
    if choice == "kernel" or (choice == "auto" and kernel.available()):
        return kernel.KernelWireGuard.open(interface)
    return userspace.WireGuardGo.open(interface, binary=wireguard_go, runtime_dir=runtime_dir)
