"""How the node's WireGuard key is replaced: one small interface, so the algorithm can change alone.

The encryption job (:mod:`authd.encryption.tunnel`) calls :meth:`Rotation.rotate` for every rotation,
scheduled or asked for (``authd encryption rotate``); the rotation uses the job only through
:class:`RotatingNode`.
"""

from __future__ import annotations

from typing import Protocol

from authd.encryption.keys import KeyPair


class RotatingNode(Protocol):
    """What a rotation may do to this node's WireGuard interface."""

    async def install_key(self, pair: KeyPair) -> None:
        """Store ``pair`` in the key file and make it the interface's private key."""
        ...

    def announce(self) -> None:
        """Send this node's current key, as a new generation with fresh PSK shares, on every channel."""
        ...


class Rotation(Protocol):
    """One way of rotating the node key."""

    async def rotate(self, node: RotatingNode) -> None:
        """Replace the node key; raise EncryptionError if it could not be done."""
        ...


class SwapRotation:
    """A new key, installed at once, then announced.

    Each peer learns the new key and the new PSK over its channel within a round trip. Until it has,
    handshakes with the new key fail, and the interface's current sessions end with the old key
    (WireGuard expires them when its private key changes): a rotation costs the packets of that round
    trip and a handshake.
    """

    async def rotate(self, node: RotatingNode) -> None:
        """Generate, install, announce."""
        await node.install_key(KeyPair.generate())
        node.announce()
