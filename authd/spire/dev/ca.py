"""One trust domain's X.509 CA as SPIRE's server runs it, with SPIRE's certificate profiles and rotation.

* The CA is self-signed ECDSA P-256: subject ``C=US, O=SPIFFE, serialNumber=<serial>``, URI SAN
  ``spiffe://<td>``, keyCertSign and cRLSign, cA=true; NotBefore backdated 10 s.
* Rotation (SPIRE's ``pkg/server/ca/manager``): the next CA is prepared, and published in the bundle, at
  ``NotAfter - min(lifetime/2, 30d)``; it starts signing at ``NotAfter - min(lifetime/6, 7d)``. A retired
  CA stays in the bundle until it expires. So a bundle routinely carries two CAs, and every SVID chains
  to a CA that was in the bundle before the SVID existed.
* Workload SVIDs: subject ``C=US, O=SPIRE`` (CN = the first DNS name, if any), URI SAN = the SPIFFE ID
  plus DNS SANs, key usage digitalSignature/keyEncipherment/keyAgreement (critical), EKU serverAuth and
  clientAuth, cA=false (critical), SKI, AKI = the CA's SKI, a random 128-bit serial, NotBefore backdated
  10 s, NotAfter = min(now + TTL, the CA's NotAfter); ECDSA P-256 keys.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from authd.identity import SpiffeId, TrustDomain
from authd.x509svid import X509Bundle, X509Svid

BACKDATE = dt.timedelta(seconds=10)
PREPARE_CAP = dt.timedelta(days=30)
ACTIVATE_CAP = dt.timedelta(days=7)


@dataclass(frozen=True, slots=True)
class CaSlot:
    """One CA key and its self-signed certificate."""

    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @property
    def not_after(self) -> dt.datetime:
        """When the CA expires."""
        return self.cert.not_valid_after_utc

    @property
    def lifetime(self) -> dt.timedelta:
        """From issuance (NotBefore is backdated) to NotAfter: the CA TTL."""
        return self.cert.not_valid_after_utc - self.cert.not_valid_before_utc - BACKDATE

    @property
    def prepare_next_at(self) -> dt.datetime:
        """When the successor is created and published."""
        return self.not_after - min(self.lifetime / 2, PREPARE_CAP)

    @property
    def activate_next_at(self) -> dt.datetime:
        """When the successor starts signing."""
        return self.not_after - min(self.lifetime / 6, ACTIVATE_CAP)

    def to_state(self) -> dict[str, str]:
        """PEM key (unencrypted PKCS#8) and certificate, for the state file."""
        key = self.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        return {"key": key.decode(), "cert": self.cert.public_bytes(serialization.Encoding.PEM).decode()}

    @classmethod
    def from_state(cls, state: dict[str, str]) -> CaSlot:
        """Load what :meth:`to_state` wrote."""
        key = serialization.load_pem_private_key(state["key"].encode(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise TypeError("dev-spire: CA key is not an EC key")
        return cls(key, x509.load_pem_x509_certificate(state["cert"].encode()))


@dataclass
class CertificateAuthority:
    """A trust domain's CA: the signing slot, the prepared successor, and retired slots still trusted."""

    trust_domain: TrustDomain
    ttl: dt.timedelta
    current: CaSlot
    next: CaSlot | None = None
    retired: list[CaSlot] = field(default_factory=list)

    @classmethod
    def create(cls, trust_domain: TrustDomain, ttl: dt.timedelta, now: dt.datetime) -> CertificateAuthority:
        """A fresh CA, valid from now (backdated) for ``ttl``."""
        return cls(trust_domain, ttl, _new_slot(trust_domain, ttl, now))

    def bundle(self) -> X509Bundle:
        """Every CA a verifier must trust now: retired ones until they expire, current, and the next."""
        slots = [*self.retired, self.current, *([self.next] if self.next else [])]
        return X509Bundle(self.trust_domain, tuple(slot.cert for slot in slots))

    def advance(self, now: dt.datetime) -> bool:
        """Apply every rotation step due at ``now``; return whether the bundle or signer changed."""
        changed = False
        if self.current.not_after <= now:  # down longer than a CA lifetime: start over
            self.retired.clear()
            self.next = None
            self.current = _new_slot(self.trust_domain, self.ttl, now)
            return True
        if self.next is None and now >= self.current.prepare_next_at:
            self.next = _new_slot(self.trust_domain, self.ttl, now)
            changed = True
        if self.next is not None and now >= self.current.activate_next_at:
            self.retired.append(self.current)
            self.current, self.next = self.next, None
            changed = True
        alive = [slot for slot in self.retired if slot.not_after > now]
        if len(alive) != len(self.retired):
            self.retired = alive
            changed = True
        return changed

    def next_change(self) -> dt.datetime:
        """When :meth:`advance` next has something to do."""
        times = [self.current.not_after, *(slot.not_after for slot in self.retired)]
        times.append(self.current.activate_next_at if self.next else self.current.prepare_next_at)
        return min(times)

    def mint(
        self, spiffe_id: SpiffeId, ttl: dt.timedelta, now: dt.datetime, dns_names: Sequence[str] = ()
    ) -> X509Svid:
        """Sign a workload X509-SVID with the current CA."""
        if not spiffe_id.member_of(self.trust_domain):
            raise ValueError(f"dev-spire: {spiffe_id} is not in trust domain {self.trust_domain}")
        signer = self.current
        key = ec.generate_private_key(ec.SECP256R1())
        names: list[x509.NameAttribute[str]] = [
            x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "SPIRE"),
        ]
        if dns_names:
            names.append(x509.NameAttribute(NameOID.COMMON_NAME, dns_names[0]))
        sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(str(spiffe_id))]
        sans.extend(x509.DNSName(name) for name in dns_names)
        leaf = (
            x509.CertificateBuilder()
            .subject_name(x509.Name(names))
            .issuer_name(signer.cert.subject)
            .public_key(key.public_key())
            .serial_number(_serial())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(min(now + ttl, signer.not_after))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(_key_usage(ca=False), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
                    signer.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
                ),
                critical=False,
            )
            .sign(signer.key, hashes.SHA256())
        )
        return X509Svid(spiffe_id, (leaf,), key)

    def to_state(self) -> dict[str, Any]:
        """Everything needed to resume after a restart."""
        return {
            "ttl_s": self.ttl.total_seconds(),
            "current": self.current.to_state(),
            "next": self.next.to_state() if self.next else None,
            "retired": [slot.to_state() for slot in self.retired],
        }

    @classmethod
    def from_state(
        cls, trust_domain: TrustDomain, ttl: dt.timedelta, state: dict[str, Any]
    ) -> CertificateAuthority:
        """Resume from :meth:`to_state`; ``ttl`` (from the command line) applies to CAs made from now on."""
        return cls(
            trust_domain,
            ttl,
            CaSlot.from_state(state["current"]),
            CaSlot.from_state(state["next"]) if state.get("next") else None,
            [CaSlot.from_state(slot) for slot in state.get("retired", [])],
        )


def _new_slot(trust_domain: TrustDomain, ttl: dt.timedelta, now: dt.datetime) -> CaSlot:
    key = ec.generate_private_key(ec.SECP256R1())
    serial = _serial()
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "SPIFFE"),
            x509.NameAttribute(NameOID.SERIAL_NUMBER, str(serial)),
        ]
    )
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + ttl)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(trust_domain.id_string())]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    return CaSlot(key, cert)


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not ca,
        content_commitment=False,
        key_encipherment=not ca,
        data_encipherment=False,
        key_agreement=not ca,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def _serial() -> int:
    """A random serial in [1, 2^128), as SPIRE draws them."""
    return x509.random_serial_number() >> 31 or 1
