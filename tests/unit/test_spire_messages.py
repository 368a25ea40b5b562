"""Fuzz-ish: randomly damaged SPIRE messages are parsed into domain objects or refused with SvidError, never
anything else (an unexpected exception type would escape the clients' handlers and stop the daemon)."""

from __future__ import annotations

import contextlib
import datetime as dt
import random

import pytest
from cryptography.hazmat.primitives import serialization

from authd.errors import SvidError
from authd.spire._proto import delegatedidentity_pb2, types_pb2, workload_pb2
from authd.spire.bundles import parse_bundle_map
from authd.spire.delegated import parse_svid_with_key
from authd.spire.workload import NodeIdentity, parse_x509_svid_response
from authd.x509svid import X509Svid
from tests.fakes.ca import NOW
from tests.fakes.ca import TestCA as FakeCA

ROUNDS = 400
NODE = NodeIdentity("node-a")


def damage(data: bytes, rng: random.Random) -> bytes:
    """One random kind of damage: flipped bytes, truncation, an inserted run, or a splice."""
    if not data:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 8)))
    kind = rng.randrange(4)
    if kind == 0:
        mutable = bytearray(data)
        for _ in range(rng.randrange(1, 4)):
            mutable[rng.randrange(len(mutable))] = rng.randrange(256)
        return bytes(mutable)
    if kind == 1:
        return data[: rng.randrange(len(data))]
    if kind == 2:
        at = rng.randrange(len(data))
        return data[:at] + bytes(rng.randrange(256) for _ in range(rng.randrange(1, 16))) + data[at:]
    at = rng.randrange(len(data))
    return data[at:] + data[:at]


def der(svid: X509Svid) -> bytes:
    return b"".join(cert.public_bytes(serialization.Encoding.DER) for cert in svid.chain)


def pkcs8(svid: X509Svid) -> bytes:
    return svid.private_key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def item(spiffe_id: str, fields: dict[str, bytes]) -> workload_pb2.X509SVID:
    return workload_pb2.X509SVID(
        spiffe_id=spiffe_id,
        x509_svid=fields["x509_svid"],
        x509_svid_key=fields["x509_svid_key"],
        bundle=fields["bundle"],
    )


@pytest.fixture(scope="module")
def material() -> tuple[FakeCA, X509Svid]:
    """A root CA, and an SVID issued under an intermediate (so chains have two certificates)."""
    root = FakeCA.create("example.org")
    return root, root.intermediate().mint("spiffe://example.org/authd/node-a")


def test_damaged_workload_api_responses_parse_or_are_refused(material: tuple[FakeCA, X509Svid]) -> None:
    root, svid = material
    root_der = root.cert.public_bytes(serialization.Encoding.DER)
    rng = random.Random(1234)
    good = {"x509_svid": der(svid), "x509_svid_key": pkcs8(svid), "bundle": root_der}
    control = workload_pb2.X509SVIDResponse(svids=[item(str(svid.spiffe_id), good)])
    assert parse_x509_svid_response(control, at=NOW, node=NODE).node_svid.spiffe_id == svid.spiffe_id
    refused = 0
    for _ in range(ROUNDS):
        fields = dict(good)
        target = rng.choice(["x509_svid", "x509_svid_key", "bundle"])
        fields[target] = damage(fields[target], rng)
        message = workload_pb2.X509SVIDResponse(
            svids=[item(str(svid.spiffe_id), fields)],
            federated_bundles={"spiffe://partner.org": damage(root_der, rng)} if rng.random() < 0.3 else {},
        )
        try:
            parse_x509_svid_response(message, at=NOW, node=NODE)
        except SvidError:
            refused += 1
    assert refused > ROUNDS * 0.9  # nearly every damage is caught (a few land where DER ignores them)


def test_damaged_delegated_svids_parse_or_are_refused(material: tuple[FakeCA, X509Svid]) -> None:
    _, svid = material
    rng = random.Random(5678)
    chain = [cert.public_bytes(serialization.Encoding.DER) for cert in svid.chain]
    control = delegatedidentity_pb2.X509SVIDWithKey(
        x509_svid=types_pb2.X509SVID(
            cert_chain=chain, id=types_pb2.SPIFFEID(trust_domain="example.org", path="/authd/node-a")
        ),
        x509_svid_key=pkcs8(svid),
    )
    assert parse_svid_with_key(control).spiffe_id == svid.spiffe_id
    for _ in range(ROUNDS):
        certs = list(chain)
        key = pkcs8(svid)
        if rng.random() < 0.5:
            index = rng.randrange(len(certs))
            certs[index] = damage(certs[index], rng)
        else:
            key = damage(key, rng)
        damaged = delegatedidentity_pb2.X509SVIDWithKey(
            x509_svid=types_pb2.X509SVID(
                cert_chain=certs, id=types_pb2.SPIFFEID(trust_domain="example.org", path="/authd/node-a")
            ),
            x509_svid_key=key,
        )
        with contextlib.suppress(SvidError):
            parse_svid_with_key(damaged)


def test_damaged_bundle_maps_parse_or_are_refused(material: tuple[FakeCA, X509Svid]) -> None:
    root, svid = material
    bundle = b"".join(cert.public_bytes(serialization.Encoding.DER) for cert in (root.cert, *svid.chain[1:]))
    rng = random.Random(91011)
    keys = ["spiffe://example.org", "example.org", "spiffe://example.org/x", "EXAMPLE.org", "", "spiffe://"]
    for _ in range(ROUNDS):
        entries = {rng.choice(keys): damage(bundle, rng) if rng.random() < 0.8 else bundle}
        with contextlib.suppress(SvidError):
            parse_bundle_map(entries)


def test_expired_node_svid_is_refused(material: tuple[FakeCA, X509Svid]) -> None:
    root, svid = material
    message = workload_pb2.X509SVIDResponse(
        svids=[
            workload_pb2.X509SVID(
                spiffe_id=str(svid.spiffe_id),
                x509_svid=der(svid),
                x509_svid_key=pkcs8(svid),
                bundle=root.cert.public_bytes(serialization.Encoding.DER),
            )
        ]
    )
    with pytest.raises(SvidError):
        parse_x509_svid_response(message, at=NOW + dt.timedelta(days=400), node=NODE)


def _response(root: FakeCA, *svids: X509Svid) -> workload_pb2.X509SVIDResponse:
    bundle = root.cert.public_bytes(serialization.Encoding.DER)
    return workload_pb2.X509SVIDResponse(
        svids=[
            item(
                str(svid.spiffe_id), {"x509_svid": der(svid), "x509_svid_key": pkcs8(svid), "bundle": bundle}
            )
            for svid in svids
        ]
    )


def test_node_svid_is_chosen_by_its_exact_id_not_by_position(material: tuple[FakeCA, X509Svid]) -> None:
    root, node_svid = material
    other = root.mint("spiffe://example.org/authd/node-a/extra")
    # The agent lists another SVID first (the default one): it does not become the node identity.
    context = parse_x509_svid_response(_response(root, other, node_svid), at=NOW, node=NODE)
    assert context.node_svid.spiffe_id == node_svid.spiffe_id
    assert [svid.spiffe_id for svid in context.svids] == [other.spiffe_id, node_svid.spiffe_id]


def test_a_configured_node_id_wins_over_the_derived_one(material: tuple[FakeCA, X509Svid]) -> None:
    root, derived = material
    configured = root.mint("spiffe://example.org/nodes/a")
    node = NodeIdentity("node-a", configured.spiffe_id)
    context = parse_x509_svid_response(_response(root, derived, configured), at=NOW, node=node)
    assert context.node_svid.spiffe_id == configured.spiffe_id


def test_a_response_without_the_node_id_is_refused(material: tuple[FakeCA, X509Svid]) -> None:
    root, _ = material
    others = [root.mint("spiffe://example.org/authd/node-b"), root.mint("spiffe://example.org/web")]
    with pytest.raises(SvidError) as caught:
        parse_x509_svid_response(_response(root, *others), at=NOW, node=NODE)
    assert caught.value.rule == "node-id-missing"
    assert "spiffe://example.org/authd/node-a" in str(caught.value)
    assert "issued: spiffe://example.org/authd/node-b, spiffe://example.org/web" in str(caught.value)
