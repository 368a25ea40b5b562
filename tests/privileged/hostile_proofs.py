"""SVIDs that break the rules of a node proof, as a hostile node would host them (for :mod:`foreign_node`).

Each maps to the reason node A must refuse it with: a leaf key outside the policy (an answer: the result
is refused, the channel stays), or a certificate or signature that does not parse or verify (a violation:
the channel is closed). The certificates that ``cryptography`` cannot even load are carried by
:class:`RawCertificate`, which only knows its DER.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, replace
from typing import cast

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, rsa

from authd.x509svid import X509Svid
from tests.fakes.ca import LeafOptions, TestCA


@dataclass(frozen=True)
class RawCertificate:
    """A certificate as bytes only: what ``chain_der`` sends of it, and the expiry an SVID reads."""

    der: bytes
    not_valid_after_utc: dt.datetime

    def public_bytes(self, encoding: serialization.Encoding) -> bytes:
        assert encoding is serialization.Encoding.DER
        return self.der


def _patched(svid: X509Svid, der: bytes) -> X509Svid:
    raw = cast("x509.Certificate", RawCertificate(der, svid.not_after))
    return X509Svid(svid.spiffe_id, (raw, *svid.chain[1:]), svid.private_key)


def hostile_svids(ca: TestCA, spiffe_id: str) -> dict[str, tuple[X509Svid, str, bool]]:
    """By case: the SVID to host, the reason node A refuses its proof with, and whether that is an answer."""
    now = dt.datetime.now(dt.UTC)
    live = LeafOptions(not_before=now - dt.timedelta(minutes=1), not_after=now + dt.timedelta(hours=1))
    good = ca.mint(spiffe_id, live)
    der = good.leaf.public_bytes(serialization.Encoding.DER)
    version = der.index(bytes.fromhex("a003020102"))
    v2 = der[: version + 4] + b"\x01" + der[version + 5 :]
    ec_public_key = bytes.fromhex("06072a8648ce3d0201")
    at = der.index(ec_public_key) + len(ec_public_key) - 1
    unknown_algorithm = der[:at] + b"\x09" + der[at + 1 :]
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505 - the key refused
    return {
        "rsa-1024": (ca.mint(spiffe_id, replace(live, key=weak)), "leaf-key-rsa-size", True),
        "dsa": (
            ca.mint(spiffe_id, replace(live, certified_key=dsa.generate_private_key(2048).public_key())),
            "leaf-key-algorithm",
            True,
        ),
        "p-521": (
            ca.mint(spiffe_id, replace(live, key=ec.generate_private_key(ec.SECP521R1()))),
            "leaf-key-curve",
            True,
        ),
        "x509-v2": (_patched(good, v2), "malformed-certificate", False),
        "unknown-key-algorithm": (_patched(good, unknown_algorithm), "malformed-key", True),
        "bad-signature": (
            X509Svid(good.spiffe_id, good.chain, ec.generate_private_key(ec.SECP256R1())),
            "bad-signature",
            False,
        ),
    }
