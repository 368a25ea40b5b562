"""Issue 17: what authd loads and holds.

The daemon module loads the HTTP server (aiohttp, prometheus_client), the Hubble server and the etcd
client only when the config turns them on. TLS contexts do not pile up with rotations. What authd holds
per identity keeps none of the decoding its checks did: checked certificates keep their decoded
extensions (Python objects, about 2.9 KiB traced per SVID before the fix); held SVIDs, proved chains and
re-verified results are copies that were never checked. Measured with tracemalloc over COUNT items: what
stays allocated per item.
"""

from __future__ import annotations

import datetime as dt
import gc
import subprocess
import sys
import tracemalloc
from collections.abc import Callable

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from authd.attest.proofs import SWEEP_MIN, ProofChecker, binding, chain_der, sign
from authd.attest.results import Attestation
from authd.attest.tls import ContextCache
from authd.identity import SpiffeId
from authd.x509svid import BundleSet, X509Svid, parse_svid
from tests.fakes.ca import LeafOptions, TestCA

COUNT = 200
HELD_BYTES = 1024  # per item, traced; decoded extensions alone are well above it
NOW = dt.datetime.now(dt.UTC)
LIVE = LeafOptions(not_before=NOW - dt.timedelta(minutes=1), not_after=NOW + dt.timedelta(hours=1))
CA = TestCA.create("example.org", not_before=NOW - dt.timedelta(days=1), not_after=NOW + dt.timedelta(days=1))
BUNDLES = BundleSet.of([CA.bundle()])
ASKER = SpiffeId.parse("spiffe://example.org/authd/node-a")
PROVER = SpiffeId.parse("spiffe://example.org/authd/node-b")
NONCE = bytes(range(32))
DER = serialization.Encoding.DER


def minted() -> list[X509Svid]:
    return [CA.mint(f"spiffe://example.org/w{index}", LIVE) for index in range(COUNT)]


def held_per_item(build: Callable[[], list[object]]) -> float:
    """Traced bytes still allocated per item after ``build`` (warmed up once, so caches are filled)."""
    build()
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        held = build()
        gc.collect()
        return (tracemalloc.get_traced_memory()[0] - before) / len(held)
    finally:
        tracemalloc.stop()


def test_a_parsed_svid_holds_no_decoded_extensions() -> None:
    material = [
        (
            [cert.public_bytes(DER) for cert in svid.chain],
            svid.private_key.private_bytes(
                DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            ),
        )
        for svid in minted()
    ]
    assert held_per_item(lambda: [parse_svid(chain, key) for chain, key in material]) < HELD_BYTES


def test_a_proved_chain_holds_no_decoded_extensions() -> None:
    proofs = [
        (chain_der(svid), sign(svid, binding(NONCE, ASKER, PROVER, svid.spiffe_id)), svid.spiffe_id)
        for svid in minted()
    ]

    def check_all() -> list[object]:
        checker = ProofChecker()
        return [
            checker.check(ders, signature, binding(NONCE, ASKER, PROVER, sid), sid, BUNDLES, NOW)
            for ders, signature, sid in proofs
        ]

    assert held_per_item(check_all) < HELD_BYTES


def test_reverifying_a_result_leaves_its_chain_undecoded() -> None:
    chains = [[cert.public_bytes(DER) for cert in svid.chain] for svid in minted()]

    def reverify_all() -> list[object]:
        results = [
            Attestation(SpiffeId.parse(f"spiffe://example.org/w{index}"), "node-b", "192.0.2.2",
                        tuple(x509.load_der_x509_certificate(der) for der in ders), NOW)
            for index, ders in enumerate(chains)
        ]  # fmt: skip
        for result in results:
            result.reverify(BUNDLES, NOW)
        return list(results)

    assert held_per_item(reverify_all) < HELD_BYTES


def test_the_daemon_module_loads_no_optional_server_or_client() -> None:
    optional = ["aiohttp", "prometheus_client", "authd.hubble.server", "authd.cluster.etcd"]
    probe = f"import sys, authd.daemon; print([m for m in {optional!r} if m in sys.modules])"
    loaded = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True)
    assert loaded.stdout.strip() == "[]"


def test_tls_contexts_do_not_pile_up_with_rotations() -> None:
    # Issue 17: the cache kept every rotated node SVID's contexts (~130 KiB of OpenSSL memory each).
    cache = ContextCache()
    node_id = "spiffe://example.org/authd/node-a"
    for _ in range(20):
        rotated = CA.mint(node_id, LIVE)
        cache.get(rotated, BUNDLES, server=True)
        cache.get(rotated, BUNDLES, server=False)
    assert len(cache) == 2  # one per side for the one identity


ROTATIONS = 600


def rotated_proofs(ca: TestCA) -> list[tuple[list[bytes], bytes, dt.datetime]]:
    """One identity's leaves, each valid for two seconds from its turn: (chain, signature, when checked)."""
    identity = "spiffe://example.org/rotating"
    proofs = []
    for turn in range(ROTATIONS):
        at = NOW + dt.timedelta(seconds=turn)
        svid = ca.mint(identity, LeafOptions(not_before=NOW, not_after=at + dt.timedelta(seconds=2)))
        proofs.append((chain_der(svid), sign(svid, binding(NONCE, ASKER, PROVER, svid.spiffe_id)), at))
    return proofs


def test_remembered_proofs_do_not_grow_with_rotations() -> None:
    # Issue 17: every remote rotation left its chain's digest, a parsed SPIFFE ID and the bundle set of
    # the time in the checker until 16384 had piled up (~0.5 KiB a rotation, most of the soak's slope).
    # Through an intermediate, so that issuer paths are remembered too. Traced between rotation 100 and
    # 600, what the checker retains must stay flat.
    ca = CA.intermediate()
    bundles = BUNDLES  # replaced by an equal new set each rotation, as the SVID store does
    identity = SpiffeId.parse("spiffe://example.org/rotating")
    checker = ProofChecker()

    def check(ders: list[bytes], signature: bytes, at: dt.datetime) -> None:
        nonlocal bundles
        bundles = BundleSet(dict(bundles.bundles))
        checker.check(ders, signature, binding(NONCE, ASKER, PROVER, identity), identity, bundles, at)

    proofs = rotated_proofs(ca)
    for proof in proofs[:100]:
        check(*proof)
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for proof in proofs[100:]:
            check(*proof)
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    # About 270 KiB before the fix; about 30 KiB now, most of it inside cryptography's verify calls.
    assert grown < 64 * 1024
    assert checker.remembered <= 4 * SWEEP_MIN


def test_remembered_proofs_still_save_the_checks() -> None:
    # The sweep keeps what is still usable: a re-sent proof under the same bundles is a cache hit, and a
    # new leaf under a remembered intermediate is checked against that intermediate alone.
    ca = CA.intermediate()
    bundles = BUNDLES
    identity = SpiffeId.parse("spiffe://example.org/rotating")
    checker = ProofChecker()
    for ders, signature, at in rotated_proofs(ca)[: 2 * SWEEP_MIN]:
        message = binding(NONCE, ASKER, PROVER, identity)
        checker.check(ders, signature, message, identity, bundles, at)
        checker.check(ders, signature, message, identity, bundles, at)
    assert checker.cache_hits == 2 * SWEEP_MIN
    assert checker.issuer_hits == 2 * SWEEP_MIN - 1
