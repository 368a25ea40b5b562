"""Identity proofs: "I, node P, host R", made for node A in one channel session, and their check.

A proof is R's chain and a signature, made with R's private key, over :func:`binding`: a context string,
A's nonce for this session, A's node ID, P's node ID and R's SPIFFE ID, each length-prefixed. Holding R's
SVID is what hosting R means; the nonce keeps the proof to this session, the node IDs to this pair of
nodes (a node that also hosts R cannot pass its proof off as P's), and R's ID to R.

:class:`ProofChecker` verifies the chain against the bundle of R's trust domain with the exact ID R, then
the signature. Chains verified under the bundle set in force are remembered (by their DER digest) until
the first certificate expires or the bundles change, so a re-sent or rotated-back proof costs one
signature check; so are issuer paths (the certificates above the leaf), so that a new leaf under an
intermediate already verified is checked against that intermediate alone. A chain that breaks an SVID
rule is an answer (:func:`authd.attest.outcomes.chain_rule`); certificates or signatures that do not
parse or verify are a :class:`~authd.attest.outcomes.ViolationError`.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from datetime import datetime
from typing import TypeVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

from authd.attest.outcomes import ViolationError
from authd.identity import SpiffeId
from authd.x509svid import BundleSet, PrivateKey, X509Svid, authorize_id, fresh_copy, verify_path

_CONTEXT = b"authd-channel-proof/1\0"

_E = TypeVar("_E", tuple[BundleSet, SpiffeId, datetime], tuple[BundleSet, datetime])


def binding(nonce: bytes, asker: SpiffeId, prover: SpiffeId, identity: SpiffeId) -> bytes:
    """What a proof signs (see the module docstring)."""
    parts = (nonce, str(asker).encode(), str(prover).encode(), str(identity).encode())
    return _CONTEXT + b"".join(len(part).to_bytes(2, "big") + part for part in parts)


def sign(svid: X509Svid, message: bytes) -> bytes:
    """Sign ``message`` with the SVID's key."""
    key: PrivateKey = svid.private_key
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.sign(message, ec.ECDSA(hashes.SHA256()))
    if isinstance(key, rsa.RSAPrivateKey):
        return key.sign(message, padding.PKCS1v15(), hashes.SHA256())
    return key.sign(message)


def chain_der(svid: X509Svid) -> list[bytes]:
    """The SVID's chain as DER, leaf first, as a proof carries it."""
    return [cert.public_bytes(serialization.Encoding.DER) for cert in svid.chain]


def check_signature(leaf: x509.Certificate, signature: bytes, message: bytes) -> None:
    """Verify ``signature`` over ``message`` with the leaf's key; a ViolationError if it does not verify."""
    try:
        key = leaf.public_key()
        if isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(signature, message, ec.ECDSA(hashes.SHA256()))
        elif isinstance(key, rsa.RSAPublicKey):
            key.verify(signature, message, padding.PKCS1v15(), hashes.SHA256())
        elif isinstance(key, ed25519.Ed25519PublicKey):
            key.verify(signature, message)
        else:
            raise ViolationError("unsupported-key", f"proof leaf has a {type(key).__name__}")
    except InvalidSignature as err:
        raise ViolationError("bad-signature", "the proof is not signed for this session") from err
    except (UnsupportedAlgorithm, ValueError) as err:
        raise ViolationError("unsupported-key", f"proof leaf key cannot be used: {err}") from err


def load_chain(ders: Sequence[bytes]) -> tuple[x509.Certificate, ...]:
    """Parse a proof's certificates; a ViolationError if any does not parse (X.509 v1/v2 included)."""
    try:
        return tuple(x509.load_der_x509_certificate(der) for der in ders)
    except (ValueError, x509.InvalidVersion, UnsupportedAlgorithm) as err:
        raise ViolationError("malformed-certificate", f"unparsable certificate in a proof: {err}") from err


SWEEP_MIN = 16
"""Remembered chains (or issuer paths) below which no sweep runs."""


class ProofChecker:
    """Checks proofs against the bundles in force, remembering chains and issuer paths already verified.

    What is remembered is only useful until it expires or the bundles change, and rotations keep adding
    chains that are never seen again: every remote rotation is a new leaf. So whenever a cache has
    doubled since its last sweep, entries that expired, or were verified under other bundles than the
    last ones, are dropped (amortized O(1) per proof): each cache holds at most about twice what is
    still usable, and never keeps a replaced bundle set alive. ``max_entries`` bounds both caches
    whatever the clock says (LRU).
    """

    def __init__(self, max_entries: int = 16384) -> None:
        """Remember at most ``max_entries`` verified chains and as many issuer paths (LRU)."""
        self._max_entries = max_entries
        self._verified: OrderedDict[bytes, tuple[BundleSet, SpiffeId, datetime]] = OrderedDict()
        self._issuers: OrderedDict[bytes, tuple[BundleSet, datetime]] = OrderedDict()
        self._sweep_at = {"verified": SWEEP_MIN, "issuers": SWEEP_MIN}
        self.cache_hits = 0
        self.issuer_hits = 0

    @property
    def remembered(self) -> int:
        """How many verified chains and issuer paths are remembered."""
        return len(self._verified) + len(self._issuers)

    def _remember(
        self,
        name: str,
        cache: OrderedDict[bytes, _E],
        key: bytes,
        entry: _E,
        bundles: BundleSet,
        at: datetime,
    ) -> None:
        """Add ``entry`` (its bundles first, its expiry last), sweeping or evicting as the class says."""
        cache[key] = entry
        cache.move_to_end(key)
        if len(cache) >= self._sweep_at[name]:
            for stale in [k for k, held in cache.items() if held[0] is not bundles or at >= held[-1]]:
                del cache[stale]
            self._sweep_at[name] = max(SWEEP_MIN, 2 * len(cache))
        if len(cache) > self._max_entries:
            cache.popitem(last=False)

    def check(
        self,
        ders: Sequence[bytes],
        signature: bytes,
        message: bytes,
        identity: SpiffeId,
        bundles: BundleSet,
        at: datetime,
    ) -> tuple[x509.Certificate, ...]:
        """The verified chain of a proof of ``identity``; SvidError for a rule, else ViolationError."""
        chain = load_chain(ders)
        key = _digest(ders)
        known = self._verified.get(key)
        if known is not None and known[0] is bundles and known[1] == identity and at < known[2]:
            self._verified.move_to_end(key)
            self.cache_hits += 1
        else:
            self._verify(chain, ders, identity, bundles, at)
            expiry = min(c.not_valid_after_utc for c in chain)
            self._remember("verified", self._verified, key, (bundles, identity, expiry), bundles, at)
        check_signature(chain[0], signature, message)
        return fresh_copy(chain)  # held for as long as the result lives: none of the checks' decoding

    def _verify(
        self,
        chain: tuple[x509.Certificate, ...],
        ders: Sequence[bytes],
        identity: SpiffeId,
        bundles: BundleSet,
        at: datetime,
    ) -> None:
        """Verify a chain, against the leaf's issuer alone when the path above it was verified before.

        Many SVIDs share one intermediate: once a full path through ``chain[1:]`` verified under these
        bundles for a trust domain, later leaves of that trust domain under it are checked against
        ``chain[1]`` (see :func:`authd.x509svid.verify_path`), until a certificate of that path expires or
        the bundles change.
        """
        # Keyed by the trust domain too: a path verified under one trust domain's bundle says nothing of
        # a leaf that claims another (each trust domain's SVIDs chain to its own bundle only).
        upper = _digest([identity.trust_domain.name.encode(), *ders[1:]]) if len(ders) > 1 else None
        known = self._issuers.get(upper) if upper is not None else None
        shortcut = known is not None and known[0] is bundles and at < known[1]
        if shortcut:
            self.issuer_hits += 1
        try:
            _, path = verify_path(
                chain, bundles, at=at, authorize=authorize_id(identity), issuer_verified=shortcut
            )
        except (ValueError, UnsupportedAlgorithm, x509.InvalidVersion) as err:
            raise ViolationError("malformed-certificate", f"cannot read a proved chain: {err}") from err
        if upper is None:
            return
        if shortcut:
            self._issuers.move_to_end(upper)
        elif list(path[1 : len(chain)]) == list(chain[1:]):  # the path built used every certificate given
            expiry = min(c.not_valid_after_utc for c in path[1:])
            self._remember("issuers", self._issuers, upper, (bundles, expiry), bundles, at)


def _digest(ders: Sequence[bytes]) -> bytes:
    return hashlib.sha256(b"".join(len(d).to_bytes(4, "big") + d for d in ders)).digest()
