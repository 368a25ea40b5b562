"""X509-SVID parsing and verification: one broken rule per certificate, each refused by its rule name.

Every certificate is minted here by tests/fakes/ca.py (a P-256 CA per trust domain): ``example.org`` is
the local trust domain, ``other.org`` a federated one whose bundle the verifier also holds.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa, x25519
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID

from authd.errors import SvidError
from authd.identity import SpiffeId, TrustDomain
from authd.x509svid import (
    Authorizer,
    BundleSet,
    PrivateKey,
    X509Bundle,
    X509Svid,
    authorize_id,
    authorize_member_of,
    authorize_one_of,
    parse_svid,
    split_der,
    verify_chain,
)
from tests.fakes.ca import NOW, CAOptions, LeafOptions, TestCA

LOCAL = TrustDomain("example.org")
FEDERATED = TrustDomain("other.org")
WORKLOAD = "spiffe://example.org/workload"
PEER = "spiffe://other.org/peer"

Chain = tuple[x509.Certificate, ...]


@dataclass(frozen=True)
class World:
    """The CAs and bundles the verification cases draw on."""

    local: TestCA
    federated: TestCA
    both: BundleSet = field(init=False)
    local_only: BundleSet = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "both", BundleSet.of([self.local.bundle(), self.federated.bundle()]))
        object.__setattr__(self, "local_only", BundleSet.of([self.local.bundle()]))


@pytest.fixture(scope="module")
def world() -> World:
    return World(TestCA.create("example.org"), TestCA.create("other.org"))


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def _pkcs8(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _patched(cert: x509.Certificate, old: bytes, new: bytes) -> x509.Certificate:
    """Rewrite bytes inside a certificate (which breaks its signature: for shape checks only)."""
    der = _der(cert)
    assert der.count(old) == 1
    return x509.load_der_x509_certificate(der.replace(old, new))


def _refusal(
    rule: str, chain: Sequence[x509.Certificate], bundles: BundleSet, authorize: Authorizer | None = None
) -> SvidError:
    with pytest.raises(SvidError) as caught:
        verify_chain(chain, bundles, at=NOW, authorize=authorize or authorize_member_of(LOCAL))
    assert caught.value.rule == rule, caught.value
    assert str(caught.value).startswith(f"x509svid: {rule}: ")
    return caught.value


# --- one rule broken per certificate ---------------------------------------------------------------

# A case builds (chain, bundles) from the world; the verifier must refuse it by the rule named.
Case = Callable[[World], tuple[Chain, BundleSet]]


def _leaf(options: LeafOptions, spiffe_id: str = WORKLOAD) -> Case:
    return lambda w: (w.local.mint(spiffe_id, options).chain, w.both)


def _uri(uri: str) -> Case:
    return _leaf(LeafOptions(uris=(uri,)))


def _two_intermediates_under_path_length_zero(w: World) -> tuple[Chain, BundleSet]:
    capped = w.local.intermediate(CAOptions(path_length=0))
    return capped.intermediate().mint(WORKLOAD).chain, w.both


def _rotated_out(w: World) -> tuple[Chain, BundleSet]:
    # The previous CA of the same trust domain, no longer in its bundle after rotation.
    previous = TestCA.create("example.org")
    return previous.mint(WORKLOAD).chain, w.both


def _impostor_root(w: World) -> tuple[Chain, BundleSet]:
    # A self-made CA that copies the trusted root's subject name: only its key differs.
    impostor = TestCA(LOCAL, ec.generate_private_key(ec.SECP256R1()), w.local.cert)
    return impostor.mint(WORKLOAD).chain, w.both


def _expired_root(w: World) -> tuple[Chain, BundleSet]:
    del w  # this case needs a world of its own
    expired = TestCA.create("example.org", not_before=NOW - 2 * DAY, not_after=NOW - DAY)
    return expired.mint(WORKLOAD).chain, BundleSet.of([expired.bundle()])


def _appended_non_ca(w: World) -> tuple[Chain, BundleSet]:
    # Certificate substitution: a good chain with another workload's leaf slipped in after it.
    intermediate = w.local.intermediate()
    good = intermediate.mint(WORKLOAD).chain
    return (*good, w.local.mint("spiffe://example.org/other").leaf), w.both


def _duplicate_san_extension(w: World) -> tuple[Chain, BundleSet]:
    # Two SAN extensions, each with one URI: a one-URI check per extension would pass both.
    second = x509.SubjectAlternativeName([x509.UniformResourceIdentifier("spiffe://example.org/admin")])
    placeholder = x509.UnrecognizedExtension(x509.ObjectIdentifier("2.5.29.99"), second.public_bytes())
    leaf = w.local.mint(WORKLOAD, LeafOptions(extensions=((placeholder, False),))).leaf
    # 2.5.29.99 -> 2.5.29.17 (subjectAltName): same length, so the DER stays well formed.
    return (_patched(leaf, bytes.fromhex("0603551d63"), bytes.fromhex("0603551d11")),), w.both


def _unsupported_general_name(w: World) -> tuple[Chain, BundleSet]:
    uri = WORKLOAD.encode()
    names = b"\x86" + bytes([len(uri)]) + uri + b"\xa3\x02\x30\x00"  # the URI, then an x400Address
    san = x509.UnrecognizedExtension(
        ExtensionOID.SUBJECT_ALTERNATIVE_NAME, b"\x30" + bytes([len(names)]) + names
    )
    return w.local.mint(WORKLOAD, LeafOptions(uris=(), extensions=((san, False),))).chain, w.both


def _undecodable_subject(w: World) -> tuple[Chain, BundleSet]:
    # The subject is decoded lazily, by cryptography's path builder: invalid UTF-8 in it, plus an unknown
    # signature algorithm (1.2.840.10045.4.3.2 -> 1.30.840...) in the TBS part.
    leaf = w.local.mint(WORKLOAD).leaf
    der = _der(leaf).replace(b"SPIRE", b"SP\xe6RE")
    ecdsa_sha256 = bytes.fromhex("06082a8648ce3d040302")
    at = der.index(ecdsa_sha256)
    der = der[:at] + bytes.fromhex("0608468648ce3d040302") + der[at + len(ecdsa_sha256) :]
    return (x509.load_der_x509_certificate(der),), w.both


HOUR = dt.timedelta(hours=1)
DAY = dt.timedelta(days=1)

REFUSALS: dict[str, tuple[Case, str]] = {
    "two URI SANs": (_leaf(LeafOptions(uris=(WORKLOAD, "spiffe://example.org/b"))), "uri-san-multiple"),
    "a SPIFFE and an https URI SAN": (
        _leaf(LeafOptions(uris=(WORKLOAD, "https://example.org/workload"))),
        "uri-san-multiple",
    ),
    "two SAN extensions": (_duplicate_san_extension, "malformed-certificate"),
    "SAN with an unsupported name type": (_unsupported_general_name, "malformed-certificate"),
    "undecodable subject": (_undecodable_subject, "malformed-certificate"),
    "no SAN": (_leaf(LeafOptions(uris=())), "uri-san-missing"),
    "DNS SAN only": (
        _leaf(
            LeafOptions(
                uris=(), extensions=((x509.SubjectAlternativeName([x509.DNSName("example.org")]), False),)
            )
        ),
        "uri-san-missing",
    ),
    "non-spiffe URI": (_uri("https://example.org/workload"), "spiffe-id"),
    "misspelt scheme": (_uri("sparfe://example.org/workload"), "spiffe-id"),
    "uppercase scheme": (_uri("SPIFFE://example.org/workload"), "spiffe-id"),
    "uppercase trust domain": (_uri("spiffe://Example.org/workload"), "spiffe-id"),
    "trust domain with a port": (_uri("spiffe://example.org:443/workload"), "spiffe-id"),
    "empty path segment": (_uri("spiffe://example.org/a//b"), "spiffe-id"),
    "dot segment": (_uri("spiffe://example.org/a/./b"), "spiffe-id"),
    "dot-dot segment": (_uri("spiffe://example.org/a/../b"), "spiffe-id"),
    "trailing slash": (_uri("spiffe://example.org/workload/"), "spiffe-id"),
    "percent-encoded path": (_uri("spiffe://example.org/work%6Coad"), "spiffe-id"),
    "bad path character": (_uri("spiffe://example.org/work load"), "spiffe-id"),
    "root path": (_uri("spiffe://example.org"), "root-path"),
    "CA leaf": (_leaf(LeafOptions(ca=True)), "leaf-ca"),
    "keyCertSign leaf": (_leaf(LeafOptions(key_cert_sign=True)), "leaf-key-cert-sign"),
    "cRLSign leaf": (_leaf(LeafOptions(crl_sign=True)), "leaf-crl-sign"),
    "no digitalSignature": (_leaf(LeafOptions(digital_signature=False)), "leaf-digital-signature"),
    "no key usage": (_leaf(LeafOptions(key_usage=False)), "key-usage-missing"),
    "EKU serverAuth only": (_leaf(LeafOptions(eku=(ExtendedKeyUsageOID.SERVER_AUTH,))), "extended-key-usage"),
    "EKU clientAuth only": (_leaf(LeafOptions(eku=(ExtendedKeyUsageOID.CLIENT_AUTH,))), "extended-key-usage"),
    "EKU codeSigning only": (
        _leaf(LeafOptions(eku=(ExtendedKeyUsageOID.CODE_SIGNING,))),
        "extended-key-usage",
    ),
    "unknown critical extension": (
        _leaf(
            LeafOptions(
                extensions=(
                    (
                        x509.UnrecognizedExtension(x509.ObjectIdentifier("1.3.6.1.4.1.99999.1"), b"\x05\x00"),
                        True,
                    ),
                )
            )
        ),
        "untrusted-chain",
    ),
    "expired": (_leaf(LeafOptions(not_before=NOW - 2 * HOUR, not_after=NOW - HOUR)), "expired"),
    "not yet valid": (_leaf(LeafOptions(not_before=NOW + HOUR, not_after=NOW + 2 * HOUR)), "not-yet-valid"),
    "expired intermediate": (
        lambda w: (
            w.local.intermediate(CAOptions(not_before=NOW - 2 * DAY, not_after=NOW - DAY))
            .mint(WORKLOAD)
            .chain,
            w.both,
        ),
        "expired",
    ),
    "intermediate not yet valid": (
        lambda w: (
            w.local.intermediate(CAOptions(not_before=NOW + DAY, not_after=NOW + 2 * DAY))
            .mint(WORKLOAD)
            .chain,
            w.both,
        ),
        "not-yet-valid",
    ),
    "local CA signing another trust domain's ID": (
        lambda w: (w.local.mint(PEER).chain, w.both),
        "untrusted-chain",
    ),
    "local CA signing an unfederated trust domain's ID": (
        lambda w: (w.local.mint(PEER).chain, w.local_only),
        "unknown-trust-domain",
    ),
    "chained to an unfederated trust domain's CA": (
        lambda w: (w.federated.mint(WORKLOAD).chain, w.local_only),
        "untrusted-chain",
    ),
    "cross-trust-domain forgery by a federated CA": (
        lambda w: (w.federated.mint(WORKLOAD).chain, w.both),
        "untrusted-chain",
    ),
    "cross-trust-domain forgery through a federated intermediate": (
        lambda w: (w.federated.intermediate().mint(WORKLOAD).chain, w.both),
        "untrusted-chain",
    ),
    "unknown trust domain": (lambda w: (w.federated.mint(PEER).chain, w.local_only), "unknown-trust-domain"),
    "no bundles at all": (lambda w: (w.local.mint(WORKLOAD).chain, BundleSet({})), "unknown-trust-domain"),
    "empty bundle": (
        lambda w: (w.local.mint(WORKLOAD).chain, BundleSet.of([X509Bundle(LOCAL, ())])),
        "untrusted-chain",
    ),
    "intermediate without the CA flag": (
        lambda w: (w.local.intermediate(CAOptions(ca=False)).mint(WORKLOAD).chain, w.both),
        "signing-not-ca",
    ),
    "intermediate without keyCertSign": (
        lambda w: (w.local.intermediate(CAOptions(key_cert_sign=False)).mint(WORKLOAD).chain, w.both),
        "signing-key-cert-sign",
    ),
    "local bundle holding another trust domain's CA": (
        lambda w: (w.local.mint(WORKLOAD).chain, BundleSet.of([X509Bundle(LOCAL, (w.federated.cert,))])),
        "untrusted-chain",
    ),
    "non-CA certificate appended to the chain": (_appended_non_ca, "signing-not-ca"),
    "intermediate missing from the chain": (
        lambda w: (w.local.intermediate().mint(WORKLOAD).chain[:1], w.both),
        "untrusted-chain",
    ),
    "path length constraint exceeded": (_two_intermediates_under_path_length_zero, "untrusted-chain"),
    "signed by a CA rotated out of the bundle": (_rotated_out, "untrusted-chain"),
    "impostor root with the trusted root's name": (_impostor_root, "untrusted-chain"),
    "expired root in the bundle": (_expired_root, "untrusted-chain"),
    "empty chain": (lambda w: ((), w.both), "empty-chain"),
}


@pytest.mark.parametrize(("case", "rule"), REFUSALS.values(), ids=REFUSALS.keys())
def test_refused_by_the_rule_it_breaks(world: World, case: Case, rule: str) -> None:
    chain, bundles = case(world)
    called: list[SpiffeId] = []
    _refusal(rule, chain, bundles, authorize=called.append)
    assert called == [], "the authorizer must only see verified IDs"


def test_forgery_detail_names_the_claimed_trust_domain(world: World) -> None:
    err = _refusal("untrusted-chain", world.federated.mint(WORKLOAD).chain, world.both)
    assert 'bundle of "example.org"' in str(err)


def test_expired_detail_says_which_certificate(world: World) -> None:
    intermediate = world.local.intermediate(CAOptions(not_before=NOW - 2 * DAY, not_after=NOW - DAY))
    err = _refusal("expired", intermediate.mint(WORKLOAD).chain, world.both)
    assert "certificate 1" in str(err)


@pytest.mark.parametrize(
    ("authorize", "rule"),
    [
        (authorize_id(SpiffeId.parse("spiffe://example.org/someone-else")), "unexpected-id"),
        (authorize_id(SpiffeId.parse("spiffe://other.org/workload")), "unexpected-id"),
        (authorize_one_of([SpiffeId.parse("spiffe://example.org/a"), SpiffeId.parse(PEER)]), "unexpected-id"),
        (authorize_one_of([]), "unexpected-id"),
        (authorize_member_of(FEDERATED), "unexpected-trust-domain"),
    ],
)
def test_authorizers_say_why_they_refuse(world: World, authorize: Authorizer, rule: str) -> None:
    err = _refusal(rule, world.local.mint(WORKLOAD).chain, world.both, authorize=authorize)
    assert WORKLOAD in str(err) or "example.org" in str(err)


# --- acceptance --------------------------------------------------------------------------------------


def _accepts(
    chain: Sequence[x509.Certificate],
    bundles: BundleSet,
    expected: str = WORKLOAD,
    *,
    at: dt.datetime = NOW,
) -> None:
    want = SpiffeId.parse(expected)
    assert verify_chain(chain, bundles, at=at, authorize=authorize_id(want)) == want


def test_accepts_a_leaf_directly_under_the_root(world: World) -> None:
    _accepts(world.local.mint(WORKLOAD).chain, world.both)


def test_accepts_one_and_two_intermediates(world: World) -> None:
    one = world.local.intermediate()
    two = one.intermediate()
    assert len(one.mint(WORKLOAD).chain) == 2
    assert len(two.mint(WORKLOAD).chain) == 3
    _accepts(one.mint(WORKLOAD).chain, world.both)
    _accepts(two.mint(WORKLOAD).chain, world.both)


def test_accepts_a_chain_that_also_presents_the_root(world: World) -> None:
    _accepts((*world.local.intermediate().mint(WORKLOAD).chain, world.local.cert), world.both)


def test_accepts_leaves_of_either_ca_while_rotation_overlaps(world: World) -> None:
    previous, current = TestCA.create("example.org"), TestCA.create("example.org")
    overlap = BundleSet.of([X509Bundle(LOCAL, (previous.cert, current.cert)), world.federated.bundle()])
    _accepts(previous.mint(WORKLOAD).chain, overlap)
    _accepts(current.intermediate().mint(WORKLOAD).chain, overlap)
    after = BundleSet.of([current.bundle()])
    _accepts(current.mint(WORKLOAD).chain, after)
    _refusal("untrusted-chain", previous.mint(WORKLOAD).chain, after)


def test_accepts_a_federated_peer_signed_by_its_own_bundle(world: World) -> None:
    _accepts(world.federated.mint(PEER).chain, world.both, PEER)
    _accepts(world.federated.intermediate().mint(PEER).chain, world.both, PEER)
    assert verify_chain(
        world.federated.mint(PEER).chain, world.both, at=NOW, authorize=authorize_member_of(FEDERATED)
    ) == SpiffeId.parse(PEER)


@pytest.mark.parametrize(
    "options",
    [
        LeafOptions(eku=None),
        LeafOptions(
            eku=(
                ExtendedKeyUsageOID.CLIENT_AUTH,
                ExtendedKeyUsageOID.CODE_SIGNING,
                ExtendedKeyUsageOID.SERVER_AUTH,
            )
        ),
        LeafOptions(empty_subject=True),
        LeafOptions(digital_signature=True, key_usage=True),
        LeafOptions(
            uris=(),
            extensions=(
                (
                    x509.SubjectAlternativeName(
                        [x509.DNSName("web.example.org"), x509.UniformResourceIdentifier(WORKLOAD)]
                    ),
                    False,
                ),
            ),
        ),
        LeafOptions(key=rsa.generate_private_key(public_exponent=65537, key_size=2048)),
    ],
    ids=["no EKU", "EKU with extra purposes", "empty subject", "plain", "DNS SAN too", "RSA leaf"],
)
def test_accepts_what_the_specification_allows(world: World, options: LeafOptions) -> None:
    _accepts(world.local.mint(WORKLOAD, options).chain, world.both)


def test_validity_bounds_are_inclusive(world: World) -> None:
    svid = world.local.mint(WORKLOAD)
    _accepts(svid.chain, world.both, at=svid.not_before)
    _accepts(svid.chain, world.both, at=svid.not_after)
    for at, rule in (
        (svid.not_before - dt.timedelta(seconds=1), "not-yet-valid"),
        (svid.not_after + dt.timedelta(seconds=1), "expired"),
    ):
        with pytest.raises(SvidError) as caught:
            verify_chain(svid.chain, world.both, at=at, authorize=authorize_member_of(LOCAL))
        assert caught.value.rule == rule


def test_bundles_are_chosen_by_trust_domain_not_merged(world: World) -> None:
    # A bundle source that records which trust domains it was asked for.
    asked: list[TrustDomain] = []

    class Recording:
        def bundle_for(self, trust_domain: TrustDomain) -> X509Bundle | None:
            asked.append(trust_domain)
            return world.both.bundle_for(trust_domain)

    verify_chain(world.local.mint(WORKLOAD).chain, Recording(), at=NOW, authorize=authorize_member_of(LOCAL))
    with pytest.raises(SvidError):
        verify_chain(
            world.federated.mint(WORKLOAD).chain, Recording(), at=NOW, authorize=authorize_member_of(LOCAL)
        )
    assert asked == [LOCAL, LOCAL]


# --- parse_svid --------------------------------------------------------------------------------------


def _parse(svid: X509Svid, key_der: bytes | None = None) -> X509Svid:
    return parse_svid(
        [_der(cert) for cert in svid.chain],
        _pkcs8(svid.private_key) if key_der is None else key_der,
        hint="h",
    )


def test_parse_svid_keeps_chain_key_and_hint(world: World) -> None:
    minted = world.local.intermediate().mint(WORKLOAD)
    parsed = _parse(minted)
    assert parsed.spiffe_id == SpiffeId.parse(WORKLOAD)
    assert parsed.chain == minted.chain
    assert parsed.hint == "h"
    assert parsed.not_after == minted.leaf.not_valid_after_utc
    assert x509.load_pem_x509_certificates(parsed.chain_pem()) == list(minted.chain)
    reloaded = serialization.load_pem_private_key(parsed.key_pem(), password=None)
    assert _pkcs8(reloaded) == _pkcs8(minted.private_key)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "key",
    [rsa.generate_private_key(public_exponent=65537, key_size=2048), ed25519.Ed25519PrivateKey.generate()],
    ids=["RSA", "Ed25519"],
)
def test_parse_svid_supports_rsa_and_ed25519_keys(
    world: World, key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
) -> None:
    assert (
        _parse(world.local.mint(WORKLOAD, LeafOptions(key=key))).private_key.public_key() == key.public_key()
    )


def test_parse_svid_refuses_a_key_that_does_not_match_the_leaf(world: World) -> None:
    svid = world.local.mint(WORKLOAD)
    with pytest.raises(SvidError) as caught:
        _parse(svid, _pkcs8(ec.generate_private_key(ec.SECP256R1())))
    assert caught.value.rule == "key-mismatch"


@pytest.mark.parametrize(
    "key_der",
    [
        b"",
        b"not-DER-encoded",
        _pkcs8(ec.generate_private_key(ec.SECP256R1()))[:-5],
        x25519.X25519PrivateKey.generate().private_bytes(
            serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        ),
    ],
    ids=["empty", "garbage", "truncated", "X25519", "encrypted"],
)
def test_parse_svid_refuses_bad_keys(world: World, key_der: bytes) -> None:
    with pytest.raises(SvidError) as caught:
        _parse(world.local.mint(WORKLOAD), key_der)
    assert caught.value.rule == "malformed-key"


def test_parse_svid_refuses_a_leaf_key_on_an_unsupported_curve(world: World) -> None:
    svid = world.local.mint(WORKLOAD)
    # prime256v1 (1.2.840.10045.3.1.7) -> 1.2.840.10045.3.1.99, a curve no library knows.
    leaf = _patched(svid.leaf, bytes.fromhex("06082a8648ce3d030107"), bytes.fromhex("06082a8648ce3d030163"))
    with pytest.raises(SvidError) as caught:
        parse_svid([_der(leaf)], _pkcs8(svid.private_key))
    assert caught.value.rule == "malformed-key"


@pytest.mark.parametrize(
    ("make", "rule"),
    [
        (lambda ca: ca.mint(WORKLOAD, LeafOptions(uris=())), "uri-san-missing"),
        (lambda ca: ca.mint(WORKLOAD, LeafOptions(ca=True)), "leaf-ca"),
        (lambda ca: ca.mint(WORKLOAD, LeafOptions(digital_signature=False)), "leaf-digital-signature"),
        (lambda ca: ca.mint(WORKLOAD, LeafOptions(key_cert_sign=True)), "leaf-key-cert-sign"),
        (lambda ca: ca.mint(WORKLOAD, LeafOptions(crl_sign=True)), "leaf-crl-sign"),
        (lambda ca: ca.mint("spiffe://example.org"), "root-path"),
        (lambda ca: ca.intermediate(CAOptions(ca=False)).mint(WORKLOAD), "signing-not-ca"),
        (lambda ca: ca.intermediate(CAOptions(key_cert_sign=False)).mint(WORKLOAD), "signing-key-cert-sign"),
    ],
    ids=[
        "no SPIFFE ID",
        "CA leaf",
        "no digitalSignature",
        "keyCertSign",
        "cRLSign",
        "root path",
        "intermediate not a CA",
        "intermediate without keyCertSign",
    ],
)
def test_parse_svid_checks_the_shape(world: World, make: Callable[[TestCA], X509Svid], rule: str) -> None:
    with pytest.raises(SvidError) as caught:
        _parse(make(world.local))
    assert caught.value.rule == rule


@pytest.mark.parametrize(
    "chain_der", [[], [b"not-DER-encoded"], [b"\x30\x03\x02\x01\x01"]], ids=["none", "garbage", "not a cert"]
)
def test_parse_svid_refuses_bad_certificates(world: World, chain_der: list[bytes]) -> None:
    with pytest.raises(SvidError) as caught:
        parse_svid(chain_der, _pkcs8(world.local.mint(WORKLOAD).private_key))
    assert caught.value.rule == ("empty-chain" if not chain_der else "malformed-certificate")


# --- the leaf key policy (authd.keypolicy) -----------------------------------------------------------

# Keys an SVID can hold (cryptography signs with them): minted with the key itself, so parse_svid's
# key-match check passes and only the policy decides.
ACCEPTED_KEYS: dict[str, Callable[[], PrivateKey]] = {
    "P-256": lambda: ec.generate_private_key(ec.SECP256R1()),
    "P-384": lambda: ec.generate_private_key(ec.SECP384R1()),
    "Ed25519": ed25519.Ed25519PrivateKey.generate,
    "RSA-2048": lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048),
    "RSA-3072": lambda: rsa.generate_private_key(public_exponent=65537, key_size=3072),
}
REFUSED_KEYS: dict[str, tuple[Callable[[], CertificatePublicKeyTypes], str]] = {
    "RSA-1024": (
        lambda: rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key(),  # noqa: S505 - the key refused
        "leaf-key-rsa-size",
    ),
    "RSA-2040": (
        lambda: rsa.generate_private_key(public_exponent=65537, key_size=2040).public_key(),  # noqa: S505 - the key refused
        "leaf-key-rsa-size",
    ),
    "P-521": (lambda: ec.generate_private_key(ec.SECP521R1()).public_key(), "leaf-key-curve"),
    "P-224": (lambda: ec.generate_private_key(ec.SECP224R1()).public_key(), "leaf-key-curve"),
    "secp256k1": (lambda: ec.generate_private_key(ec.SECP256K1()).public_key(), "leaf-key-curve"),
    "DSA-2048": (lambda: dsa.generate_private_key(key_size=2048).public_key(), "leaf-key-algorithm"),
    "Ed448": (lambda: ed448.Ed448PrivateKey.generate().public_key(), "leaf-key-algorithm"),
}


@pytest.mark.parametrize("name", ACCEPTED_KEYS)
def test_key_policy_accepts_its_keys_on_both_sides(world: World, name: str) -> None:
    svid = world.local.mint(WORKLOAD, LeafOptions(key=ACCEPTED_KEYS[name]()))
    assert (
        verify_chain(svid.chain, world.both, at=NOW, authorize=authorize_id(svid.spiffe_id)) == svid.spiffe_id
    )
    assert _parse(svid).spiffe_id == svid.spiffe_id


@pytest.mark.parametrize("name", REFUSED_KEYS)
def test_key_policy_refuses_every_other_key_on_both_sides(world: World, name: str) -> None:
    make, rule = REFUSED_KEYS[name]
    svid = world.local.mint(WORKLOAD, LeafOptions(certified_key=make()))
    _refusal(rule, svid.chain, world.both)  # a peer's chain, signed by a trusted CA
    with pytest.raises(SvidError) as caught:  # an SVID authd itself is handed
        _parse(svid)
    assert caught.value.rule == rule


# --- concatenated DER and bundles ---------------------------------------------------------------------


def test_split_der_cuts_concatenated_certificates(world: World) -> None:
    certs = [world.local.cert, world.federated.cert, world.local.mint(WORKLOAD).leaf]
    ders = [_der(cert) for cert in certs]
    assert all(der[1] == 0x82 for der in ders), "real certificates use the two-byte long form"
    assert split_der(b"".join(ders)) == ders
    assert split_der(b"") == []


@pytest.mark.parametrize(
    ("data", "parts"),
    [
        (b"\x30\x00", [b"\x30\x00"]),
        (b"\x30\x01\x05\x30\x00", [b"\x30\x01\x05", b"\x30\x00"]),
        (b"\x30\x7f" + b"a" * 127, [b"\x30\x7f" + b"a" * 127]),
        (b"\x30\x81\x80" + b"a" * 128, [b"\x30\x81\x80" + b"a" * 128]),
        (b"\x30\x82\x01\x00" + b"a" * 256 + b"\x30\x00", [b"\x30\x82\x01\x00" + b"a" * 256, b"\x30\x00"]),
        (b"\x30\x83\x01\x00\x00" + b"a" * 65536, [b"\x30\x83\x01\x00\x00" + b"a" * 65536]),
    ],
    ids=["empty sequence", "two", "short form max", "long form 1", "long form 2", "long form 3"],
)
def test_split_der_reads_short_and_long_lengths(data: bytes, parts: list[bytes]) -> None:
    assert split_der(data) == parts


@pytest.mark.parametrize(
    "data",
    [
        b"\x30",  # no length
        b"\x30\x05\x00",  # truncated content
        b"\x30\x81",  # long form without its length byte
        b"\x30\x82\x01",  # long form with one of two length bytes
        b"\x30\x82\xff\xff" + b"a" * 10,  # length beyond the data
        b"\x30\x80\x00\x00",  # indefinite length (BER, not DER)
        b"\x30\x85\x00\x00\x00\x00\x01\x00",  # more length bytes than any certificate needs
        b"\x31\x00",  # a SET, not a SEQUENCE
        b"-----BEGIN CERTIFICATE-----",  # PEM, not DER
        b"\x30\x00\x00",  # trailing garbage after a structure
        b"\x30\x00garbage",
    ],
)
def test_split_der_refuses_malformed_input(data: bytes) -> None:
    with pytest.raises(SvidError) as caught:
        split_der(data)
    assert caught.value.rule == "malformed-certificate"


def _with_version(cert: x509.Certificate, version: int) -> bytes:
    return _der(cert).replace(bytes.fromhex("a003020102"), bytes.fromhex("a0030201") + bytes([version]), 1)


def test_parse_svid_and_bundles_refuse_an_unknown_x509_version(world: World) -> None:
    svid = world.local.mint(WORKLOAD)
    bad_leaf = _with_version(svid.leaf, 76)
    with pytest.raises(SvidError) as caught:
        parse_svid([bad_leaf], _pkcs8(svid.private_key))
    assert caught.value.rule == "malformed-certificate"
    with pytest.raises(SvidError) as caught:
        X509Bundle.parse_der(LOCAL, _with_version(world.local.cert, 5))
    assert caught.value.rule == "malformed-certificate"


def test_bundle_round_trips_concatenated_der(world: World) -> None:
    previous = TestCA.create("example.org")
    data = _der(previous.cert) + _der(world.local.cert)
    bundle = X509Bundle.parse_der(LOCAL, data)
    assert bundle.authorities == (previous.cert, world.local.cert)
    assert bundle.der() == data


def test_empty_bundle_bytes_are_an_empty_bundle() -> None:
    bundle = X509Bundle.parse_der(LOCAL, b"")
    assert bundle == X509Bundle(LOCAL, ())
    assert bundle.der() == b""


@pytest.mark.parametrize("data", [b"\x30\x03\x02\x01\x01", b"corrupted", b"\x30\x82\x01"])
def test_bundle_refuses_bad_certificates(data: bytes) -> None:
    with pytest.raises(SvidError) as caught:
        X509Bundle.parse_der(LOCAL, data)
    assert caught.value.rule == "malformed-certificate"


def test_bundle_set_is_keyed_by_trust_domain(world: World) -> None:
    assert world.both.bundle_for(LOCAL) == world.local.bundle()
    assert world.both.bundle_for(FEDERATED) == world.federated.bundle()
    assert world.both.bundle_for(TrustDomain("elsewhere.org")) is None
