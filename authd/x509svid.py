"""X509-SVIDs and X.509 bundles: parsing, and verification per the X509-SVID specification.

Verification of a peer's chain (:func:`verify_chain`) follows X509-SVID section 5 and RFC 5280:

1. the leaf has exactly one URI SAN, a valid SPIFFE ID with a non-root path;
2. the leaf is not a CA, has the digitalSignature key usage and neither keyCertSign nor cRLSign, and an
   extended key usage, when present, allows both TLS server and client use, and its key is one
   :mod:`authd.keypolicy` accepts;
3. every other presented certificate is a CA with keyCertSign;
4. every presented certificate is valid at the given time;
5. the bundle is chosen by the *leaf's* trust domain, never from a merged store: a peer claiming
   ``example.org`` must chain to ``example.org``'s authorities even when other trust domains are federated;
6. RFC 5280 path validation against that bundle, through ``cryptography``'s verifier;
7. an authorizer decides whether that SPIFFE ID is the one wanted.

Every refusal is an :class:`~authd.errors.SvidError` whose ``rule`` names the rule broken.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol, TypeVar

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import (
    Criticality,
    ExtensionPolicy,
    PolicyBuilder,
    Store,
    VerificationError,
)

from authd.errors import SpiffeIdError, SvidError
from authd.identity import SpiffeId, TrustDomain
from authd.keypolicy import check_leaf_key

_E = TypeVar("_E", bound=x509.ExtensionType)

# RFC 5280 path validation without the Web PKI's profile (SPIFFE CAs need no AKI, DNS names or EKU);
# the SVID rules themselves are checked explicitly by check_shape(), which cryptography's
# permissive end-entity policy would not enforce.
_CA_POLICY = ExtensionPolicy.permit_all().require_present(x509.BasicConstraints, Criticality.AGNOSTIC, None)

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey

Authorizer = Callable[[SpiffeId], None]
"""Accepts a verified peer SPIFFE ID or raises SvidError saying why not."""


@dataclass(frozen=True, slots=True)
class X509Bundle:
    """The X.509 authorities of one trust domain."""

    trust_domain: TrustDomain
    authorities: tuple[x509.Certificate, ...]

    @classmethod
    def parse_der(cls, trust_domain: TrustDomain, data: bytes) -> X509Bundle:
        """Parse concatenated DER certificates; empty input is an empty bundle."""
        return cls(trust_domain, tuple(_load_certificate(der) for der in split_der(data)))

    def der(self) -> bytes:
        """The authorities as concatenated DER."""
        return b"".join(cert.public_bytes(serialization.Encoding.DER) for cert in self.authorities)


class BundleSource(Protocol):
    """Where a verifier finds the bundle of a trust domain."""

    def bundle_for(self, trust_domain: TrustDomain) -> X509Bundle | None:
        """Return the bundle of ``trust_domain``, or None if it is not trusted at all."""
        ...


@dataclass(frozen=True, slots=True)
class BundleSet:
    """Bundles keyed by trust domain: one per domain, never merged."""

    bundles: Mapping[TrustDomain, X509Bundle]

    @classmethod
    def of(cls, bundles: Iterable[X509Bundle]) -> BundleSet:
        """Key bundles by their trust domain."""
        return cls({bundle.trust_domain: bundle for bundle in bundles})

    def bundle_for(self, trust_domain: TrustDomain) -> X509Bundle | None:
        """Return the bundle of ``trust_domain``, if any."""
        return self.bundles.get(trust_domain)


@dataclass(frozen=True, slots=True)
class X509Svid:
    """An X509-SVID with its private key: what a workload (or authd) presents in TLS."""

    spiffe_id: SpiffeId
    chain: tuple[x509.Certificate, ...]
    private_key: PrivateKey
    hint: str = ""
    not_after: datetime = field(init=False, repr=False, compare=False)
    """When the leaf expires (UTC): one object, shared by every auth entry that expires with it."""

    def __post_init__(self) -> None:
        """Read the leaf's expiry once."""
        object.__setattr__(self, "not_after", self.chain[0].not_valid_after_utc)

    @property
    def leaf(self) -> x509.Certificate:
        """The end-entity certificate."""
        return self.chain[0]

    @property
    def not_before(self) -> datetime:
        """When the leaf becomes valid (UTC)."""
        return self.leaf.not_valid_before_utc

    def chain_pem(self) -> bytes:
        """Leaf then intermediates, PEM encoded."""
        return b"".join(cert.public_bytes(serialization.Encoding.PEM) for cert in self.chain)

    def key_pem(self) -> bytes:
        """The private key as unencrypted PKCS#8 PEM."""
        return self.private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )


def parse_svid(chain_der: Sequence[bytes], key_der: bytes, hint: str = "") -> X509Svid:
    """Build an SVID from DER certificates (leaf first) and a PKCS#8 DER key, checking its shape.

    Checks everything about the SVID itself (leaf and signing certificate rules, the key matching the
    leaf); trust in its issuer is the verifier's business, not the holder's.
    """
    chain = tuple(_load_certificate(der) for der in chain_der)
    spiffe_id = check_shape(chain)
    try:
        key = serialization.load_der_private_key(key_der, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as err:
        raise SvidError("malformed-key", f"cannot parse PKCS#8 private key: {err}") from err
    if not isinstance(key, PrivateKey):
        raise SvidError("malformed-key", f"unsupported private key type {type(key).__name__}")
    if _spki(key) != _spki(chain[0]):
        raise SvidError("key-mismatch", "leaf certificate does not match private key")
    return X509Svid(spiffe_id, tuple(_load_certificate(der) for der in chain_der), key, hint)


def fresh_copy(chain: Sequence[x509.Certificate]) -> tuple[x509.Certificate, ...]:
    """The certificates parsed again from their DER, with nothing decoded yet.

    Checking a certificate decodes its extensions, and cryptography keeps them on the object for its
    lifetime (about 2.7 KiB a certificate). So what authd holds for as long as an SVID or a result
    lives (:func:`parse_svid`'s SVIDs, attestation chains) is a copy that was never checked, and checks
    of held chains run on a copy.
    """
    return tuple(_load_certificate(cert.public_bytes(serialization.Encoding.DER)) for cert in chain)


def verify_chain(
    chain: Sequence[x509.Certificate], bundles: BundleSource, *, at: datetime, authorize: Authorizer
) -> SpiffeId:
    """Verify a peer's presented chain (leaf first) at time ``at``; return its authorized SPIFFE ID."""
    return verify_path(chain, bundles, at=at, authorize=authorize)[0]


def verify_path(
    chain: Sequence[x509.Certificate],
    bundles: BundleSource,
    *,
    at: datetime,
    authorize: Authorizer,
    issuer_verified: bool = False,
) -> tuple[SpiffeId, list[x509.Certificate]]:
    """Verify a chain as :func:`verify_chain` does; return the ID and the path built (leaf to anchor).

    ``issuer_verified`` says the caller saw ``chain[1:]`` verified under these same bundles, as the path
    from the leaf's issuer up to an authority, and it is still valid at ``at``: then the leaf is checked
    against ``chain[1]`` as the only anchor, which saves checking the rest of the path again. The shortcut
    is skipped where it would not be exact: when any certificate in the bundle or above the leaf carries
    name constraints (they apply to the leaf too).
    """
    spiffe_id = check_shape(chain)
    leaf = chain[0]
    # cryptography checks validity too, but reports it as a failed path; checking first names the rule.
    for position, cert in enumerate(chain):
        _check_validity(cert, position, at)
    bundle = bundles.bundle_for(spiffe_id.trust_domain)
    if bundle is None:
        raise SvidError(
            "unknown-trust-domain", f'no X.509 bundle for trust domain "{spiffe_id.trust_domain}"'
        )
    if not bundle.authorities:
        raise SvidError("untrusted-chain", f'bundle of "{spiffe_id.trust_domain}" has no authorities')
    anchors, intermediates = list(bundle.authorities), list(chain[1:])
    if issuer_verified and len(chain) > 1 and not _name_constrained([*anchors, *intermediates]):
        anchors, intermediates = [chain[1]], []
    verifier = (
        PolicyBuilder()
        .store(Store(anchors))
        .time(at)
        .extension_policies(ca_policy=_CA_POLICY, ee_policy=ExtensionPolicy.permit_all())
        .build_client_verifier()
    )
    try:
        path = verifier.verify(leaf, intermediates).chain
    except VerificationError as err:
        raise SvidError(
            "untrusted-chain", f'does not chain to the bundle of "{spiffe_id.trust_domain}": {err}'
        ) from err
    except ValueError as err:  # a part decoded lazily by the path builder, such as a Name, is malformed
        raise SvidError("malformed-certificate", f"cannot verify the chain: {err}") from err
    authorize(spiffe_id)
    return spiffe_id, path


def _name_constrained(certs: Sequence[x509.Certificate]) -> bool:
    return any(_extension(cert, x509.NameConstraints) is not None for cert in certs)


def check_shape(chain: Sequence[x509.Certificate]) -> SpiffeId:
    """Apply the X509-SVID rules on the certificates themselves; return the leaf's SPIFFE ID."""
    if not chain:
        raise SvidError("empty-chain", "no certificates")
    spiffe_id = _check_leaf(chain[0])
    for position, cert in enumerate(chain[1:], start=1):
        constraints = _extension(cert, x509.BasicConstraints)
        if constraints is None or not constraints.ca:
            raise SvidError("signing-not-ca", f"certificate {position} in the chain is not a CA")
        usage = _extension(cert, x509.KeyUsage)
        if usage is None or not usage.key_cert_sign:
            raise SvidError("signing-key-cert-sign", f"certificate {position} in the chain lacks keyCertSign")
    return spiffe_id


def _check_validity(cert: x509.Certificate, position: int, at: datetime) -> None:
    which = "the leaf" if position == 0 else f"certificate {position} in the chain"
    # RFC 5280 4.1.2.5: both bounds are inclusive.
    if at < cert.not_valid_before_utc:
        raise SvidError("not-yet-valid", f"{which} is valid from {cert.not_valid_before_utc.isoformat()}")
    if at > cert.not_valid_after_utc:
        raise SvidError("expired", f"{which} expired at {cert.not_valid_after_utc.isoformat()}")


def _check_leaf(leaf: x509.Certificate) -> SpiffeId:
    spiffe_id = spiffe_id_of(leaf)
    if spiffe_id.is_root:
        raise SvidError("root-path", f"leaf SPIFFE ID {spiffe_id} must have a non-root path")
    constraints = _extension(leaf, x509.BasicConstraints)
    if constraints is not None and constraints.ca:
        raise SvidError("leaf-ca", "leaf certificate must not have the CA flag set")
    usage = _extension(leaf, x509.KeyUsage)
    if usage is None:
        raise SvidError("key-usage-missing", "leaf certificate has no key usage extension")
    if not usage.digital_signature:
        raise SvidError("leaf-digital-signature", "leaf certificate must have the digitalSignature key usage")
    if usage.key_cert_sign:
        raise SvidError("leaf-key-cert-sign", "leaf certificate must not have the keyCertSign key usage")
    if usage.crl_sign:
        raise SvidError("leaf-crl-sign", "leaf certificate must not have the cRLSign key usage")
    extended = _extension(leaf, x509.ExtendedKeyUsage)
    both = {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    if extended is not None and not both <= set(extended):
        raise SvidError(
            "extended-key-usage", "leaf extended key usage must include serverAuth and clientAuth"
        )
    check_leaf_key(leaf)
    return spiffe_id


def spiffe_id_of(cert: x509.Certificate) -> SpiffeId:
    """The SPIFFE ID in a certificate's only URI SAN."""
    names = _extension(cert, x509.SubjectAlternativeName)
    uris = names.get_values_for_type(x509.UniformResourceIdentifier) if names is not None else []
    if not uris:
        raise SvidError("uri-san-missing", "certificate contains no URI SAN")
    if len(uris) > 1:
        raise SvidError("uri-san-multiple", "certificate contains more than one URI SAN")
    try:
        return SpiffeId.parse(uris[0])
    except SpiffeIdError as err:
        raise SvidError("spiffe-id", f"URI SAN {uris[0]!r} is not a SPIFFE ID: {err}") from err


def authorize_id(expected: SpiffeId) -> Authorizer:
    """Accept exactly ``expected``."""

    def authorize(actual: SpiffeId) -> None:
        if actual != expected:
            raise SvidError("unexpected-id", f'unexpected ID "{actual}", want "{expected}"')

    return authorize


def authorize_one_of(allowed: Iterable[SpiffeId]) -> Authorizer:
    """Accept any ID in ``allowed``."""
    allowed_set = frozenset(allowed)

    def authorize(actual: SpiffeId) -> None:
        if actual not in allowed_set:
            raise SvidError("unexpected-id", f'unexpected ID "{actual}"')

    return authorize


def authorize_member_of(trust_domain: TrustDomain) -> Authorizer:
    """Accept any ID in ``trust_domain``."""

    def authorize(actual: SpiffeId) -> None:
        if not actual.member_of(trust_domain):
            raise SvidError("unexpected-trust-domain", f'unexpected trust domain "{actual.trust_domain}"')

    return authorize


def split_der(data: bytes) -> list[bytes]:
    """Split concatenated DER structures (certificates) by their outer SEQUENCE lengths."""
    parts: list[bytes] = []
    offset = 0
    while offset < len(data):
        if data[offset] != 0x30 or offset + 2 > len(data):
            raise SvidError("malformed-certificate", f"no DER SEQUENCE at offset {offset}")
        first = data[offset + 1]
        if first < 0x80:
            length, header = first, 2
        else:
            count = first & 0x7F
            if not 1 <= count <= 4 or offset + 2 + count > len(data):
                raise SvidError("malformed-certificate", f"bad DER length at offset {offset}")
            length = int.from_bytes(data[offset + 2 : offset + 2 + count], "big")
            header = 2 + count
        end = offset + header + length
        if end > len(data):
            raise SvidError("malformed-certificate", f"DER structure at offset {offset} is truncated")
        parts.append(data[offset:end])
        offset = end
    return parts


def _load_certificate(der: bytes) -> x509.Certificate:
    try:
        return x509.load_der_x509_certificate(der)
    except (ValueError, x509.InvalidVersion) as err:  # InvalidVersion is not a ValueError
        raise SvidError("malformed-certificate", f"cannot parse DER certificate: {err}") from err


def _extension(cert: x509.Certificate, kind: type[_E]) -> _E | None:
    try:
        return cert.extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None
    # All extensions are decoded on first access: any malformed, duplicated or unsupported one fails
    # the certificate, whichever extension was asked for. DuplicateExtension and
    # UnsupportedGeneralNameType are not ValueErrors; left uncaught, a hostile certificate would escape
    # the verifier as a non-AuthdError.
    except (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType) as err:
        raise SvidError(
            "malformed-certificate", f"bad extensions looking for {kind.__name__}: {err}"
        ) from err


def _spki(cert_or_key: x509.Certificate | PrivateKey) -> bytes:
    try:
        public_key = cert_or_key.public_key()
    except (ValueError, UnsupportedAlgorithm) as err:
        raise SvidError("malformed-key", f"unsupported public key: {err}") from err
    if not isinstance(public_key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey):
        raise SvidError("malformed-key", f"unsupported public key type {type(public_key).__name__}")
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
