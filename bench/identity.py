"""X509-SVID verification throughput, read against the raw signature checks it is built on.

``identity.svid_verify_per_s`` is a full :func:`authd.x509svid.verify_chain` (SVID shape rules, validity,
bundle choice, RFC 5280 path validation, authorizer) of a leaf and an intermediate under a root in the
bundle, all P-256. ``identity.p256_verify_per_s`` is cryptography's bare ECDSA P-256/SHA-256
verification on the same machine in the same run; the path validation performs two of those, so the
ratio ``identity.svid_verify_cost_in_p256_verifies`` (ideally near 2) stays readable when the machine is
noisy and absolute rates are not.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from authd.identity import SpiffeId
from authd.x509svid import BundleSet, authorize_id, verify_chain
from bench.figures import Figures, figure, median
from tests.fakes.ca import NOW, TestCA

ROUNDS = 7
ROUND_SECONDS = 0.25


def run() -> Figures:
    """Time both operations in alternating rounds, so drifting machine load hits them alike."""
    root = TestCA.create("example.org")
    svid = root.intermediate().mint("spiffe://example.org/bench")
    bundles = BundleSet.of([root.bundle()])
    authorize = authorize_id(SpiffeId.parse("spiffe://example.org/bench"))
    assert len(svid.chain) == 2  # leaf and intermediate: the shape the figure promises

    def verify_svid() -> None:
        verify_chain(svid.chain, bundles, at=NOW, authorize=authorize)

    issuer_key = svid.chain[1].public_key()
    assert isinstance(issuer_key, ec.EllipticCurvePublicKey)
    leaf = svid.leaf
    algorithm = ec.ECDSA(hashes.SHA256())

    def verify_signature() -> None:
        issuer_key.verify(leaf.signature, leaf.tbs_certificate_bytes, algorithm)

    svid_rates: list[float] = []
    p256_rates: list[float] = []
    svid_batch, p256_batch = _calibrate(verify_svid), _calibrate(verify_signature)
    for _ in range(ROUNDS):
        svid_rates.append(_rate(verify_svid, svid_batch))
        p256_rates.append(_rate(verify_signature, p256_batch))
    svid_rate, p256_rate = median(svid_rates), median(p256_rates)
    return {
        "identity.svid_verify_per_s": figure(svid_rate, "1/s"),
        "identity.p256_verify_per_s": figure(p256_rate, "1/s"),
        "identity.svid_verify_cost_in_p256_verifies": figure(p256_rate / svid_rate, "ratio"),
    }


def _calibrate(operation: Callable[[], None]) -> int:
    """How many calls take about ROUND_SECONDS (after a warm-up call)."""
    operation()
    batch = 1
    while True:
        elapsed = _elapsed(operation, batch)
        if elapsed >= ROUND_SECONDS / 10:
            return max(1, round(batch * ROUND_SECONDS / elapsed))
        batch *= 4


def _rate(operation: Callable[[], None], batch: int) -> float:
    return batch / _elapsed(operation, batch)


def _elapsed(operation: Callable[[], None], batch: int) -> float:
    started = time.perf_counter()
    for _ in range(batch):
        operation()
    return time.perf_counter() - started
