"""Which leaf keys authd accepts: the one place of that rule, for its own SVIDs and for every peer's.

Accepted: EC on P-256 or P-384, Ed25519, RSA of at least 2048 bits. Anything else is refused with an
:class:`~authd.errors.SvidError` whose rule names what is wrong:

* ``leaf-key-rsa-size``: an RSA key shorter than 2048 bits;
* ``leaf-key-curve``: an EC key on any other curve (P-521, P-224, Brainpool, secp256k1, ...);
* ``leaf-key-algorithm``: any other algorithm (DSA, Ed448, ...);
* ``malformed-key``: a key the library cannot decode at all (an unknown algorithm or curve OID).

:func:`authd.x509svid.check_shape` applies it to every leaf, so SVIDs authd is handed by SPIRE and
chains peers present go through the same rule.
"""

from __future__ import annotations

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from authd.errors import SvidError

MIN_RSA_BITS = 2048
CURVES: frozenset[str] = frozenset({ec.SECP256R1.name, ec.SECP384R1.name})


def check_leaf_key(leaf: x509.Certificate) -> None:
    """Refuse the leaf unless its public key is one authd accepts."""
    try:
        key = leaf.public_key()
    except (ValueError, UnsupportedAlgorithm) as err:
        raise SvidError("malformed-key", f"unsupported public key: {err}") from err
    if isinstance(key, ed25519.Ed25519PublicKey):
        return
    if isinstance(key, ec.EllipticCurvePublicKey):
        if key.curve.name not in CURVES:
            raise SvidError("leaf-key-curve", f"leaf EC key on {key.curve.name}, want P-256 or P-384")
        return
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            raise SvidError(
                "leaf-key-rsa-size", f"leaf RSA key has {key.key_size} bits, want at least {MIN_RSA_BITS}"
            )
        return
    raise SvidError("leaf-key-algorithm", f"leaf key type {type(key).__name__} is not accepted")
