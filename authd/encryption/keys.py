"""WireGuard keys: the node's X25519 key pair, its key file, and per-node-pair preshared keys.

The private key is kept on disk, in ``<state_dir>/wireguard.key`` (32 raw bytes, mode 0600, written
atomically): a restarted authd keeps its interface's key, so peers need not learn a new one and flows
through the tunnel survive a crash. A key file readable by anyone but its owner is refused, not used.

A preshared key is never sent. Each end of a node channel sends an ephemeral X25519 public key over the
channel; both compute the same shared secret, and :func:`preshared_key` expands it, with both nodes'
SPIFFE IDs and both channel nonces, into the PSK of that pair. Only the two ends of that mutually
authenticated TLS session can compute it, so the WireGuard session is bound to both node SVIDs.
"""

from __future__ import annotations

import base64
import contextlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from authd.errors import EncryptionError
from authd.identity import SpiffeId

KEY_BYTES = 32
KEY_FILE = "wireguard.key"
_PSK_INFO = b"authd wireguard psk v1"


@dataclass(frozen=True, slots=True)
class PublicKey:
    """A WireGuard public key (32 bytes); UAPI writes it in hex, netlink and ``wg`` in base64."""

    raw: bytes

    def __post_init__(self) -> None:
        """Refuse anything but 32 bytes."""
        if len(self.raw) != KEY_BYTES:
            raise EncryptionError(f"encryption: a WireGuard key has {KEY_BYTES} bytes, not {len(self.raw)}")

    def hex(self) -> str:
        """Lowercase hex, as the UAPI protocol writes keys."""
        return self.raw.hex()

    def base64(self) -> str:
        """Base64, as ``wg`` and the kernel's netlink interface write keys."""
        return base64.b64encode(self.raw).decode()

    def __str__(self) -> str:
        """The base64 form operators know from ``wg show``."""
        return self.base64()


class KeyPair:
    """An X25519 key pair; the private half is only ever handed to the WireGuard backend."""

    __slots__ = ("_private", "public")

    def __init__(self, private: X25519PrivateKey) -> None:
        """Wrap ``private`` and compute its public key."""
        self._private = private
        self.public = PublicKey(private.public_key().public_bytes_raw())

    @classmethod
    def generate(cls) -> KeyPair:
        """A fresh key pair."""
        return cls(X25519PrivateKey.generate())

    @classmethod
    def from_raw(cls, raw: bytes) -> KeyPair:
        """The key pair of a 32-byte private key."""
        if len(raw) != KEY_BYTES:
            raise EncryptionError(
                f"encryption: a WireGuard private key has {KEY_BYTES} bytes, not {len(raw)}"
            )
        return cls(X25519PrivateKey.from_private_bytes(raw))

    def private_raw(self) -> bytes:
        """The 32 private bytes (for the backend and the key file only)."""
        return self._private.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )

    def exchange(self, peer: PublicKey) -> bytes:
        """The X25519 shared secret with ``peer``."""
        return self._private.exchange(X25519PublicKey.from_public_bytes(peer.raw))

    def __repr__(self) -> str:
        """Only the public half."""
        return f"KeyPair(public={self.public})"


def load_or_create(state_dir: Path) -> KeyPair:
    """The node key from ``state_dir``, made and stored (0600) if there is none."""
    path = state_dir / KEY_FILE
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        pair = KeyPair.generate()
        store(state_dir, pair)
        return pair
    except OSError as err:
        raise EncryptionError(f"encryption: cannot open the key file {path}: {err}") from err
    with os.fdopen(fd, "rb") as file:
        mode = os.fstat(file.fileno()).st_mode
        if stat.S_IMODE(mode) & 0o077 or not stat.S_ISREG(mode):
            raise EncryptionError(
                f"encryption: the key file {path} must be a regular file only its owner can read "
                f"(mode {stat.S_IMODE(mode):04o})"
            )
        raw = file.read(KEY_BYTES + 1)
    return KeyPair.from_raw(raw)


def store(state_dir: Path, pair: KeyPair) -> None:
    """Write the node key to ``state_dir`` atomically, mode 0600."""
    path = state_dir / KEY_FILE
    temporary = path.with_name(f".{KEY_FILE}.{os.getpid()}")
    try:
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as file:
            file.write(pair.private_raw())
            file.flush()
            os.fsync(file.fileno())
        temporary.replace(path)
    except OSError as err:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise EncryptionError(f"encryption: cannot write the key file {path}: {err}") from err


def preshared_key(shared: bytes, ends: tuple[SpiffeId, SpiffeId], nonces: tuple[bytes, bytes]) -> bytes:
    """The PSK of one node pair for one channel session: the same on both ends, whatever their order.

    ``shared`` is the X25519 secret of the two ephemeral keys sent over the channel; ``ends`` are the two
    node IDs and ``nonces`` the two channel nonces, in any order (both ends sort them the same way).
    """
    ids = sorted(str(end).encode() for end in ends)
    salt = b"".join(sorted(nonces))
    info = _PSK_INFO + b"".join(len(i).to_bytes(2, "big") + i for i in ids)
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=salt, info=info).derive(shared)
