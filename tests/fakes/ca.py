"""An in-memory CA for tests: SPIRE-shaped certificates by default, any rule broken on request."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import ClassVar

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from authd.identity import SpiffeId, TrustDomain
from authd.x509svid import PrivateKey, X509Bundle, X509Svid

NOW = dt.datetime(2026, 11, 25, 12, 0, tzinfo=dt.UTC)


@dataclass(frozen=True)
class LeafOptions:
    """How a minted leaf deviates from a good SPIRE workload SVID."""

    uris: tuple[str, ...] | None = None  # None: the SVID's own SPIFFE ID
    ca: bool = False
    digital_signature: bool = True
    key_cert_sign: bool = False
    crl_sign: bool = False
    key_usage: bool = True
    eku: tuple[x509.ObjectIdentifier, ...] | None = (
        ExtendedKeyUsageOID.SERVER_AUTH,
        ExtendedKeyUsageOID.CLIENT_AUTH,
    )
    not_before: dt.datetime | None = None
    not_after: dt.datetime | None = None
    empty_subject: bool = False  # then the SAN extension is critical, as RFC 5280 requires
    extensions: tuple[tuple[x509.ExtensionType, bool], ...] = ()  # more (extension, critical) pairs
    key: PrivateKey | None = None  # None: a fresh P-256 key
    # The leaf certifies this key instead of ``key``'s (for key types an SVID cannot hold).
    certified_key: CertificatePublicKeyTypes | None = None


@dataclass(frozen=True)
class CAOptions:
    """How a minted intermediate CA deviates from a good SPIRE signing certificate."""

    ca: bool = True
    key_cert_sign: bool = True
    path_length: int | None = None
    not_before: dt.datetime | None = None  # None: the parent's validity
    not_after: dt.datetime | None = None
    name_constraints: x509.NameConstraints | None = None


@dataclass
class TestCA:
    """A CA for one trust domain: a self-signed root, or an intermediate below one."""

    __test__: ClassVar[bool] = False  # a fake, not a test class, despite its name

    trust_domain: TrustDomain
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate
    chain_above_leaf: tuple[x509.Certificate, ...] = ()  # what a leaf minted here must present after itself

    @classmethod
    def create(
        cls, trust_domain: str, *, not_before: dt.datetime | None = None, not_after: dt.datetime | None = None
    ) -> TestCA:
        td = TrustDomain(trust_domain)
        key = ec.generate_private_key(ec.SECP256R1())
        validity = (not_before or NOW - dt.timedelta(days=1), not_after or NOW + dt.timedelta(days=30))
        return cls(td, key, _ca_certificate(td, key, signer=None, validity=validity, options=CAOptions()))

    def bundle(self) -> X509Bundle:
        return X509Bundle(self.trust_domain, (self.cert,))

    def intermediate(self, options: CAOptions | None = None) -> TestCA:
        """A CA signed by this one, whose leaves present it as an intermediate."""
        opts = options or CAOptions()
        key = ec.generate_private_key(ec.SECP256R1())
        validity = (
            opts.not_before or self.cert.not_valid_before_utc,
            opts.not_after or self.cert.not_valid_after_utc,
        )
        cert = _ca_certificate(
            self.trust_domain, key, signer=(self.key, self.cert), validity=validity, options=opts
        )
        return TestCA(self.trust_domain, key, cert, (cert, *self.chain_above_leaf))

    def mint(self, spiffe_id: str, options: LeafOptions | None = None) -> X509Svid:
        """Mint a leaf for ``spiffe_id`` (validity: an hour around NOW unless overridden)."""
        opts = options or LeafOptions()
        key = opts.key or ec.generate_private_key(ec.SECP256R1())
        uris = opts.uris if opts.uris is not None else (spiffe_id,)
        builder = (
            x509.CertificateBuilder()
            .subject_name(
                x509.Name(
                    []
                    if opts.empty_subject
                    else [
                        x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
                        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "SPIRE"),
                    ]
                )
            )
            .issuer_name(self.cert.subject)
            .public_key(opts.certified_key or key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(opts.not_before or NOW - dt.timedelta(minutes=5))
            .not_valid_after(opts.not_after or NOW + dt.timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=opts.ca, path_length=None), critical=True)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(opts.certified_key or key.public_key()),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False
            )
        )
        if uris:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]),
                critical=opts.empty_subject,
            )
        if opts.key_usage:
            builder = builder.add_extension(
                x509.KeyUsage(
                    digital_signature=opts.digital_signature,
                    content_commitment=False,
                    key_encipherment=True,
                    data_encipherment=False,
                    key_agreement=True,
                    key_cert_sign=opts.key_cert_sign,
                    crl_sign=opts.crl_sign,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
        if opts.eku is not None:
            builder = builder.add_extension(x509.ExtendedKeyUsage(list(opts.eku)), critical=False)
        for extension, critical in opts.extensions:
            builder = builder.add_extension(extension, critical=critical)
        leaf = builder.sign(self.key, hashes.SHA256())
        svid_id = (
            SpiffeId.parse(spiffe_id)
            if opts.uris is None
            else SpiffeId.parse(f"spiffe://{self.trust_domain}/x")
        )
        return X509Svid(svid_id, (leaf, *self.chain_above_leaf), key)


def _ca_certificate(
    trust_domain: TrustDomain,
    key: ec.EllipticCurvePrivateKey,
    *,
    signer: tuple[ec.EllipticCurvePrivateKey, x509.Certificate] | None,
    validity: tuple[dt.datetime, dt.datetime],
    options: CAOptions,
) -> x509.Certificate:
    signing_key = signer[0] if signer else key
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "SPIFFE"),
            x509.NameAttribute(NameOID.SERIAL_NUMBER, str(x509.random_serial_number())),
        ]
    )
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(signer[1].subject if signer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(validity[0])
        .not_valid_after(validity[1])
        .add_extension(
            x509.BasicConstraints(ca=options.ca, path_length=options.path_length if options.ca else None),
            critical=True,
        )
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=options.key_cert_sign,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(signing_key.public_key()), critical=False
        )
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(trust_domain.id_string())]),
            critical=False,
        )
    )
    if options.name_constraints is not None:
        builder = builder.add_extension(options.name_constraints, critical=True)
    return builder.sign(signing_key, hashes.SHA256())
