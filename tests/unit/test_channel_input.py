"""Hostile input on the node channel: every malformed frame, certificate or signature is refused by reason."""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from authd.attest import wire
from authd.attest._proto.channel_pb2 import Frame, Hello, Proof
from authd.attest.outcomes import NOT_HOSTED, ViolationError, chain_rule, not_hosted
from authd.attest.proofs import ProofChecker, binding, chain_der, sign
from authd.errors import SvidError
from authd.identity import SpiffeId
from authd.x509svid import BundleSet, authorize_id, verify_path
from tests.fakes.ca import CAOptions, LeafOptions, TestCA
from tests.fuzz.channel import ASKER, NONCE, PROVER, fuzz

NOW = dt.datetime.now(dt.UTC)
LIVE = LeafOptions(not_before=NOW - dt.timedelta(minutes=1), not_after=NOW + dt.timedelta(hours=1))
DB = SpiffeId.parse("spiffe://example.org/db")
CA = TestCA.create("example.org", not_before=NOW - dt.timedelta(days=1), not_after=NOW + dt.timedelta(days=1))
BUNDLES = BundleSet.of([CA.bundle()])
HELLO_WITH_UNKNOWN_FIELD = (
    Frame(hello=Hello(version=1, nonce=NONCE)).SerializeToString() + b"\x0a\x02\x78\x01"
)


def check(
    ders: list[bytes], signature: bytes, identity: SpiffeId = DB, checker: ProofChecker | None = None
) -> None:
    message = binding(NONCE, ASKER, PROVER, identity)
    (checker or ProofChecker()).check(ders, signature, message, identity, BUNDLES, NOW)


def test_a_valid_proof_verifies_once_and_then_from_the_cache() -> None:
    svid = CA.mint(str(DB), LIVE)
    signature = sign(svid, binding(NONCE, ASKER, PROVER, DB))
    checker = ProofChecker()
    check(chain_der(svid), signature, checker=checker)
    check(chain_der(svid), signature, checker=checker)
    assert checker.cache_hits == 1


@pytest.mark.parametrize(
    ("nonce", "asker", "prover", "identity"),
    [
        (bytes(32), ASKER, PROVER, DB),  # another session
        (NONCE, PROVER, ASKER, DB),  # the node IDs swapped
        (NONCE, ASKER, SpiffeId.parse("spiffe://example.org/authd/node-c"), DB),  # another prover
    ],
)
def test_a_signature_bound_to_something_else_is_a_violation(
    nonce: bytes, asker: SpiffeId, prover: SpiffeId, identity: SpiffeId
) -> None:
    svid = CA.mint(str(DB), LIVE)
    with pytest.raises(ViolationError) as caught:
        check(chain_der(svid), sign(svid, binding(nonce, asker, prover, identity)))
    assert caught.value.reason == "bad-signature"


def test_a_chain_for_another_identity_is_an_answer() -> None:
    svid = CA.mint("spiffe://example.org/api", LIVE)
    with pytest.raises(SvidError) as caught:
        check(chain_der(svid), sign(svid, binding(NONCE, ASKER, PROVER, DB)))
    assert chain_rule(caught.value).answer


def test_an_x509_v2_certificate_is_a_violation() -> None:
    der = bytearray(chain_der(CA.mint(str(DB), LIVE))[0])
    version = der.index(bytes.fromhex("a003020102"))
    der[version + 4] = 1  # v2
    with pytest.raises(ViolationError) as caught:
        check([bytes(der)], b"x")
    assert caught.value.reason == "malformed-certificate"


def test_an_unknown_key_algorithm_is_refused_without_escaping() -> None:
    der = bytearray(chain_der(CA.mint(str(DB), LIVE))[0])
    ec_public_key = bytes.fromhex("06072a8648ce3d0201")
    at = der.index(ec_public_key)
    der[at + len(ec_public_key) - 1] = 0x09  # an OID no library knows
    with pytest.raises((ViolationError, SvidError)):
        check([bytes(der)], b"x")


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"\x0a\xff\xff\xff\xff\x0f", "malformed-frame"),  # a length past the end
        (b"\x0b" * 10_000, "malformed-frame"),  # deep group nesting
        (Frame(hello=Hello(version=1, nonce=b"short")).SerializeToString(), "malformed-frame"),
        (Frame(proof=Proof(spiffe_id="spiffe://example.org/db")).SerializeToString(), "malformed-frame"),
        (
            Frame(hello=Hello(version=1, nonce=NONCE)).SerializeToString() + b"\x0a\x02\x78\x01",
            "malformed-frame",
        ),
    ],
)
def test_malformed_frames_are_violations(payload: bytes, reason: str) -> None:
    with pytest.raises(ViolationError) as caught:
        wire.decode(payload)
    assert caught.value.reason == reason


def test_a_frame_of_a_kind_this_version_does_not_know_is_skipped() -> None:
    assert wire.decode(b"\x7a\x03abc") is None  # field 15: a later version's message


async def test_an_oversize_frame_is_refused_unread() -> None:
    import asyncio  # noqa: PLC0415

    reader = asyncio.StreamReader()
    reader.feed_data((wire.MAX_FRAME + 1).to_bytes(4, "big"))
    with pytest.raises(ViolationError) as caught:
        await wire.read(reader)
    assert caught.value.reason == "oversize-frame"


def test_ids_that_are_not_spiffe_ids_are_violations() -> None:
    with pytest.raises(ViolationError) as caught:
        wire.spiffe_id("spiffe://example.org/db\n")
    assert caught.value.reason == "malformed-id"


def test_not_hosted_is_an_answer_only_once_synced() -> None:
    assert not_hosted(synced=True).answer
    assert not_hosted(synced=True).reason == NOT_HOSTED
    assert not not_hosted(synced=False).answer


def test_fuzzed_frames_and_proofs_are_only_ever_refused() -> None:
    outcomes = fuzz(3000, seed=12)
    assert outcomes["refused"] > 1000  # the mutations do reach the checks


def test_a_pem_key_is_not_what_proofs_carry() -> None:
    svid = CA.mint(str(DB), LIVE)
    assert chain_der(svid)[0] == svid.leaf.public_bytes(serialization.Encoding.DER)


def issued(ca: TestCA, path: str) -> tuple[list[bytes], bytes, SpiffeId]:
    identity = SpiffeId.parse(f"spiffe://example.org/{path}")
    svid = ca.mint(str(identity), LIVE)
    return chain_der(svid), sign(svid, binding(NONCE, ASKER, PROVER, identity)), identity


def test_a_second_leaf_under_a_verified_intermediate_is_checked_against_it_alone() -> None:
    issuer = CA.intermediate()
    checker = ProofChecker()
    for path in ("a", "b", "c"):
        ders, signature, identity = issued(issuer, path)
        check(ders, signature, identity, checker)
    assert checker.issuer_hits == 2
    assert checker.cache_hits == 0


def test_the_issuer_shortcut_refuses_what_the_full_path_refuses() -> None:
    issuer, other = CA.intermediate(), CA.intermediate()
    checker = ProofChecker()
    ders, signature, identity = issued(issuer, "a")
    check(ders, signature, identity, checker)
    # A leaf of another intermediate, presented with the verified one: it does not chain to it.
    other_ders, other_signature, other_id = issued(other, "b")
    with pytest.raises(SvidError) as caught:
        check([other_ders[0], *ders[1:]], other_signature, other_id, checker)
    assert caught.value.rule == "untrusted-chain"
    # Bundles without the root: the remembered path is not used.
    ders, signature, identity = issued(issuer, "c")
    root = TestCA.create(
        "example.org", not_before=NOW - dt.timedelta(days=1), not_after=NOW + dt.timedelta(days=1)
    )
    elsewhere = BundleSet.of([root.bundle()])
    with pytest.raises(SvidError):
        checker.check(ders, signature, binding(NONCE, ASKER, PROVER, identity), identity, elsewhere, NOW)
    assert checker.issuer_hits == 1  # only the leaf of the other intermediate took the shortcut


def test_an_intermediate_verified_for_one_trust_domain_never_vouches_for_another() -> None:
    other = TestCA.create(
        "other.org", not_before=NOW - dt.timedelta(days=1), not_after=NOW + dt.timedelta(days=1)
    )
    federated = BundleSet.of([CA.bundle(), other.bundle()])
    issuer, checker = CA.intermediate(), ProofChecker()
    ders, signature, identity = issued(issuer, "a")
    checker.check(ders, signature, binding(NONCE, ASKER, PROVER, identity), identity, federated, NOW)
    # The same example.org intermediate signs a leaf that claims other.org: only other.org's bundle counts.
    foreign = SpiffeId.parse("spiffe://other.org/db")
    svid = issuer.mint(str(foreign), LIVE)
    with pytest.raises(SvidError) as caught:
        checker.check(
            chain_der(svid),
            sign(svid, binding(NONCE, ASKER, PROVER, foreign)),
            binding(NONCE, ASKER, PROVER, foreign),
            foreign,
            federated,
            NOW,
        )
    assert caught.value.rule == "untrusted-chain"
    assert checker.issuer_hits == 0


def test_name_constraints_above_the_leaf_turn_the_shortcut_off() -> None:
    # The verifier refuses URI name constraints; as the only anchor, the intermediate would escape them.
    constraints = x509.NameConstraints(
        permitted_subtrees=[x509.UniformResourceIdentifier(".example.org")], excluded_subtrees=None
    )
    svid = CA.intermediate(CAOptions(name_constraints=constraints)).mint(str(DB), LIVE)
    with pytest.raises(SvidError) as caught:
        verify_path(svid.chain, BUNDLES, at=NOW, authorize=authorize_id(DB), issuer_verified=True)
    assert caught.value.rule == "untrusted-chain"
    without = CA.intermediate().mint(str(DB), LIVE)
    _, path = verify_path(without.chain, BUNDLES, at=NOW, authorize=authorize_id(DB), issuer_verified=True)
    assert path == [without.chain[0], without.chain[1]]  # the issuer was the only anchor
