"""Fuzz the node channel's frame decoder and proof checks: hostile bytes may only ever be refused.

Run briefly by the suite (tests/unit/test_channel_input.py); longer by hand:
``python -m tests.fuzz.channel --iterations 200000 --seed 7``. Every input is a mutation of a valid
frame or proof (bit flips, truncation, splices, repeated and inserted bytes); whatever it decodes to must
raise :class:`~authd.attest.outcomes.ViolationError` or :class:`~authd.errors.SvidError`, or pass,
never anything else.
"""

from __future__ import annotations

import argparse
import datetime as dt
import random
from collections.abc import Callable

from authd.attest import wire
from authd.attest._proto.channel_pb2 import Hello, NotHosted, Proof, Want
from authd.attest.outcomes import ViolationError
from authd.attest.proofs import ProofChecker, binding, chain_der, sign
from authd.errors import SvidError
from authd.identity import SpiffeId
from authd.x509svid import BundleSet
from tests.fakes.ca import LeafOptions, TestCA

NONCE = bytes(range(32))
ASKER = SpiffeId.parse("spiffe://example.org/authd/node-b")
PROVER = SpiffeId.parse("spiffe://example.org/authd/node-a")


def mutate(data: bytes, rng: random.Random) -> bytes:
    """One random mutation of ``data``."""
    buf = bytearray(data)
    choice = rng.randrange(6)
    if choice == 0 and buf:
        for _ in range(rng.randint(1, 8)):
            buf[rng.randrange(len(buf))] ^= 1 << rng.randrange(8)
    elif choice == 1:
        del buf[rng.randrange(len(buf) + 1) :]
    elif choice == 2 and buf:
        start = rng.randrange(len(buf))
        buf[start:start] = buf[start : start + rng.randint(1, 64)] * rng.randint(1, 20)
    elif choice == 3:
        buf[rng.randrange(len(buf) + 1) : 0] = rng.randbytes(rng.randint(1, 32))
    elif choice == 4 and buf:
        buf[rng.randrange(len(buf))] = rng.choice((0x00, 0x7F, 0x80, 0xFF))
    else:
        buf.extend(rng.randbytes(rng.randint(1, 16)))
    return bytes(buf)


def _seeds() -> tuple[list[bytes], Callable[[bytes], None]]:
    now = dt.datetime.now(dt.UTC)
    ca = TestCA.create(
        "example.org", not_before=now - dt.timedelta(days=1), not_after=now + dt.timedelta(days=1)
    )
    svid = ca.mint(
        "spiffe://example.org/db",
        LeafOptions(not_before=now - dt.timedelta(minutes=1), not_after=now + dt.timedelta(hours=1)),
    )
    bundles = BundleSet.of([ca.bundle()])
    message = binding(NONCE, ASKER, PROVER, svid.spiffe_id)
    proof = Proof(spiffe_id=str(svid.spiffe_id), chain=chain_der(svid), signature=sign(svid, message))
    seeds = [
        wire.encode(Hello(version=wire.VERSION, nonce=NONCE))[4:],
        wire.encode(Want(add=["spiffe://example.org/db"], drop=["spiffe://example.org/api"]))[4:],
        wire.encode(proof)[4:],
        wire.encode(NotHosted(spiffe_id="spiffe://example.org/db", synced=True))[4:],
    ]
    checker = ProofChecker()

    def check(payload: bytes) -> None:
        body = wire.decode(payload)
        if isinstance(body, Proof):
            identity = wire.spiffe_id(body.spiffe_id)
            checker.check(list(body.chain), body.signature, message, identity, bundles, now)
        elif isinstance(body, Want):
            for text in [*body.add, *body.drop]:
                wire.spiffe_id(text)

    return seeds, check


def fuzz(iterations: int, seed: int) -> dict[str, int]:
    """Run ``iterations`` mutated inputs; return how many were refused and how many passed."""
    rng = random.Random(seed)
    seeds, check = _seeds()
    outcomes = {"refused": 0, "passed": 0}
    for _ in range(iterations):
        payload = rng.choice(seeds)
        for _ in range(rng.randint(1, 3)):
            payload = mutate(payload, rng)
        try:
            check(payload)
        except (ViolationError, SvidError):
            outcomes["refused"] += 1
        else:
            outcomes["passed"] += 1
    return outcomes


def main() -> None:
    """Fuzz from the command line."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--iterations", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    print(fuzz(args.iterations, args.seed))  # noqa: T201 - a command-line tool


if __name__ == "__main__":
    main()
