"""A hand-written stand-in for the encryption job, as the node channel sees it (TunnelKeys)."""

from __future__ import annotations

from dataclasses import dataclass, field

from authd.attest.channel import Ends, TunnelKey
from authd.encryption.keys import KeyPair
from authd.encryption.peers import PeerKeys


@dataclass
class FakeTunnel:
    """Announces a key the test sets; records every key a channel hands over, with its ends."""

    port: int = 51820
    pair: KeyPair = field(default_factory=KeyPair.generate)
    generation: int = 1
    received: list[tuple[Ends, PeerKeys]] = field(default_factory=list)

    def local_key(self) -> TunnelKey | None:
        return TunnelKey(self.pair.public, self.port, self.generation)

    def learned(self, ends: Ends, keys: PeerKeys) -> None:
        self.received.append((ends, keys))

    def rotate(self) -> None:
        self.pair = KeyPair.generate()
        self.generation += 1

    def last(self) -> PeerKeys | None:
        return self.received[-1][1] if self.received else None
