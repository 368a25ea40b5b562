"""The TLS 1.3 key schedule from traffic secrets onward (RFC 8446 sections 7.1 to 7.3).

A TLS 1.3 handshake ends with one application traffic secret per direction. Everything the record
layer needs follows from it with HKDF-Expand-Label: the AEAD key, the 12-byte IV whose XOR with the
64-bit record sequence number is each record's nonce, and, for a KeyUpdate, the next secret (label
``"traffic upd"``, after which the sequence number starts again at 0). The cipher suite fixes the hash
of HKDF and the key length; these are the three suites kernel TLS implements for TLS 1.3 and OpenSSL
negotiates by default.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

from authd.errors import KtlsError

IV_LENGTH = 12
"""Every TLS 1.3 AEAD suite here has a 12-byte per-record nonce (RFC 8446 section 5.3)."""

SEQUENCE_LIMIT = 1 << 64
"""Record sequence numbers are 64 bits; one must never wrap (RFC 8446 section 5.3)."""


class CipherSuite(enum.Enum):
    """A TLS 1.3 cipher suite: its name, AEAD key length and the hash of its key schedule."""

    AES_128_GCM_SHA256 = ("TLS_AES_128_GCM_SHA256", 16, "sha256")
    AES_256_GCM_SHA384 = ("TLS_AES_256_GCM_SHA384", 32, "sha384")
    CHACHA20_POLY1305_SHA256 = ("TLS_CHACHA20_POLY1305_SHA256", 32, "sha256")

    def __init__(self, iana_name: str, key_length: int, hash_name: str) -> None:
        """Members carry (IANA name, key length, hash name)."""
        self.iana_name = iana_name
        self.key_length = key_length
        self.hash_name = hash_name

    @classmethod
    def named(cls, name: str) -> CipherSuite:
        """The suite called ``name`` (as OpenSSL reports it); raise KtlsError for any other."""
        for suite in cls:
            if suite.iana_name == name:
                return suite
        raise KtlsError(f"ktls: cipher suite {name} has no kernel TLS support")

    def hash(self) -> hashes.HashAlgorithm:
        """A fresh instance of the suite's hash."""
        return hashes.SHA384() if self.hash_name == "sha384" else hashes.SHA256()

    @property
    def hash_length(self) -> int:
        """The length of the suite's traffic secrets."""
        return self.hash().digest_size


def hkdf_expand_label(suite: CipherSuite, secret: bytes, label: str, context: bytes, length: int) -> bytes:
    """HKDF-Expand-Label(secret, label, context, length) with the suite's hash (RFC 8446 section 7.1)."""
    full_label = b"tls13 " + label.encode("ascii")
    if not 7 <= len(full_label) <= 255 or len(context) > 255 or not 0 < length < 1 << 16:
        raise KtlsError("ktls: HKDF-Expand-Label arguments out of range")
    info = (
        length.to_bytes(2, "big")
        + len(full_label).to_bytes(1, "big")
        + full_label
        + len(context).to_bytes(1, "big")
        + context
    )
    return HKDFExpand(suite.hash(), length, info).derive(secret)


@dataclass(frozen=True, slots=True)
class TrafficKeys:
    """One direction's record protection: AEAD key and IV."""

    suite: CipherSuite
    key: bytes
    iv: bytes

    def nonce(self, sequence: int) -> bytes:
        """The nonce of record number ``sequence``: the IV XOR the sequence, left-padded to 12 bytes."""
        if not 0 <= sequence < SEQUENCE_LIMIT:
            raise KtlsError("ktls: record sequence number out of range")
        padded = sequence.to_bytes(IV_LENGTH, "big")
        return bytes(a ^ b for a, b in zip(self.iv, padded, strict=True))

    def __repr__(self) -> str:
        """Never show key material."""
        return f"TrafficKeys({self.suite.iana_name})"


def _check_secret(suite: CipherSuite, secret: bytes) -> None:
    if len(secret) != suite.hash_length:
        raise KtlsError(
            f"ktls: a {suite.iana_name} traffic secret has {suite.hash_length} bytes, got {len(secret)}"
        )


def traffic_keys(suite: CipherSuite, secret: bytes) -> TrafficKeys:
    """The key and IV a traffic secret gives (RFC 8446 section 7.3)."""
    _check_secret(suite, secret)
    return TrafficKeys(
        suite,
        hkdf_expand_label(suite, secret, "key", b"", suite.key_length),
        hkdf_expand_label(suite, secret, "iv", b"", IV_LENGTH),
    )


def next_traffic_secret(suite: CipherSuite, secret: bytes) -> bytes:
    """The traffic secret after a KeyUpdate in that direction (RFC 8446 section 7.2)."""
    _check_secret(suite, secret)
    return hkdf_expand_label(suite, secret, "traffic upd", b"", suite.hash_length)
