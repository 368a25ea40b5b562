"""What crosses the wire after the handshake, and what both sides need from the rest of authd.

The TLS 1.3 handshake proves that whoever answered holds the private key of identity R. It does not prove
*which node* answered: a node that also hosts R, on a path that redirects the connection, could answer
in A's place. So after the handshake the two sides run one more exchange, bound to the session:

1. the client sends a fresh random nonce (:data:`NONCE_BYTES`);
2. the listener, once it has verified the client's node SVID, answers with a *node proof*: its own node
   SVID chain and a signature, made with that SVID's key, over ``"authd-attest/2" || nonce ||
   SHA-256(the leaf it presented in this session)``;
3. the client verifies the chain against the node's trust domain bundle with the exact SPIFFE ID cluster
   state gives node A, and the signature over its nonce and the leaf it saw.

A relay cannot forge it: node A signs only for the leaf *it* presents, and only if it hosts R. The proof
also tells the client it was accepted (TLS 1.3 lets a client finish its handshake before the server has
checked the client certificate); a refused client gets no proof, only a closed connection.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Mapping
from typing import Protocol

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

from authd.errors import AttestError
from authd.identity import SpiffeId
from authd.x509svid import BundleSet, PrivateKey, X509Svid

NONCE_BYTES = 32
MAX_PROOF_BYTES = 64 * 1024
"""A node proof is one SVID chain and a signature: a few KiB. More is refused unread."""
_CONTEXT = b"authd-attest/2\0"


class LocalIdentities(Protocol):
    """The SVIDs this node holds and the bundles it trusts (the SVID store)."""

    def own_svid(self) -> X509Svid | None:
        """The node SVID this authd runs as, if held."""
        ...

    def local_svids(self) -> Mapping[SpiffeId, X509Svid]:
        """SVIDs of the workloads hosted on this node, by SPIFFE ID."""
        ...

    def svid_for(self, spiffe_id: SpiffeId) -> X509Svid | None:
        """The SVID of one workload hosted on this node, if held."""
        ...

    def bundles(self) -> BundleSet:
        """Trust bundles by trust domain."""
        ...


def signed_message(nonce: bytes, served_leaf: x509.Certificate) -> bytes:
    """What the node proof signs: the context, the client's nonce and the digest of the served leaf."""
    leaf = served_leaf.public_bytes(serialization.Encoding.DER)
    return _CONTEXT + nonce + hashlib.sha256(leaf).digest()


def node_proof(node: X509Svid, nonce: bytes, served_leaf: x509.Certificate) -> bytes:
    """The listener's answer: length-prefixed JSON with its node chain and the signature."""
    body = json.dumps(
        {
            "chain": [
                base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode()
                for cert in node.chain
            ],
            "signature": base64.b64encode(
                _sign(node.private_key, signed_message(nonce, served_leaf))
            ).decode(),
        },
        separators=(",", ":"),
    ).encode()
    return len(body).to_bytes(4, "big") + body


def parse_node_proof(body: bytes) -> tuple[tuple[x509.Certificate, ...], bytes]:
    """The node chain and signature of a proof body; AttestError("bad-node-proof") if malformed."""
    try:
        decoded = json.loads(body)
        chain = tuple(
            x509.load_der_x509_certificate(base64.b64decode(c, validate=True)) for c in decoded["chain"]
        )
        signature = base64.b64decode(decoded["signature"], validate=True)
    except (ValueError, TypeError, KeyError) as err:
        raise AttestError("bad-node-proof", f"unreadable node proof: {err}") from err
    if not chain:
        raise AttestError("bad-node-proof", "node proof without a certificate")
    return chain, signature


def check_signature(node_leaf: x509.Certificate, signature: bytes, message: bytes) -> None:
    """Verify the node proof's signature with the node leaf's key; AttestError("node-signature") if not."""
    key = node_leaf.public_key()
    try:
        if isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(signature, message, ec.ECDSA(hashes.SHA256()))
        elif isinstance(key, rsa.RSAPublicKey):
            key.verify(signature, message, padding.PKCS1v15(), hashes.SHA256())
        elif isinstance(key, ed25519.Ed25519PublicKey):
            key.verify(signature, message)
        else:
            raise AttestError("node-signature", f"unsupported node key type {type(key).__name__}")
    except InvalidSignature as err:
        raise AttestError("node-signature", "the node proof is not signed for this session") from err


def _sign(key: PrivateKey, message: bytes) -> bytes:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.sign(message, ec.ECDSA(hashes.SHA256()))
    if isinstance(key, rsa.RSAPrivateKey):
        return key.sign(message, padding.PKCS1v15(), hashes.SHA256())
    return key.sign(message)
