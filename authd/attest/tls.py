"""TLS 1.3 contexts of the node channel, built from the node SVID and bundles, and the peer chain.

The decision is always :func:`authd.x509svid.verify_chain`, run on the peer's presented chain against
the bundle of the peer's *own* trust domain, because a merged store would let a federated CA vouch for
identities of the local trust domain. On the server, OpenSSL is a first gate as well (Python cannot ask
for a client certificate without verifying it): its store holds every trusted authority, and its
security level is 0, so that a key :mod:`authd.keypolicy` refuses is refused by that rule. The client
lets OpenSSL check only the handshake itself, as go-spiffe does, so that a refusal names the SVID rule
the server broke (expired, wrong ID, CA leaf...) instead of OpenSSL's generic "verify failed"; nothing
is sent to the server before :func:`verify_chain` accepted it.

Certificates and keys reach OpenSSL through anonymous memory files (memfd), never through the disk.
Session tickets are off: every channel proves possession of the node's private key afresh.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import ssl
from collections import OrderedDict
from collections.abc import Iterator

from cryptography import x509
from cryptography.hazmat.primitives import hashes

from authd.errors import AttestError
from authd.identity import SpiffeId
from authd.x509svid import BundleSet, X509Svid

_DER = 2  # _ssl.ENCODING_DER: the encoding constant of ssl's certificate objects


def server_context(svid: X509Svid, bundles: BundleSet) -> ssl.SSLContext:
    """A context that presents ``svid`` and requires a client certificate."""
    return _context(ssl.PROTOCOL_TLS_SERVER, svid, bundles)


def client_context(svid: X509Svid, bundles: BundleSet) -> ssl.SSLContext:
    """A context that presents ``svid`` as client certificate; server names are checked by SPIFFE ID."""
    return _context(ssl.PROTOCOL_TLS_CLIENT, svid, bundles)


def _context(protocol: ssl._SSLMethod, svid: X509Svid, bundles: BundleSet) -> ssl.SSLContext:
    authorities = b"".join(bundle.der() for bundle in bundles.bundles.values())
    if not authorities:
        raise AttestError("no-bundles", "no trust bundle to verify peers with")
    context = ssl.SSLContext(protocol)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.maximum_version = ssl.TLSVersion.TLSv1_3
    context.check_hostname = False  # the peer is identified by its SPIFFE ID, not by a DNS name
    context.verify_mode = ssl.CERT_REQUIRED if protocol == ssl.PROTOCOL_TLS_SERVER else ssl.CERT_NONE
    # Every bundle certificate is a trust anchor (as in SPIFFE), even when it is not self-signed.
    context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    context.options |= ssl.OP_NO_TICKET
    if protocol == ssl.PROTOCOL_TLS_SERVER:
        # OpenSSL's security level would refuse a weak client key (RSA-1024, say) as a generic "verify
        # failed" before verify_chain runs; the key rule is authd.keypolicy's, so the gate checks only
        # that the chain is signed by a trusted authority. TLS 1.3 alone fixes the handshake's strength.
        context.set_ciphers("DEFAULT:@SECLEVEL=0")
    try:
        _load_authorities(context, authorities)
        with _memfd(svid.chain_pem()) as chain_path, _memfd(svid.key_pem()) as key_path:
            context.load_cert_chain(chain_path, key_path)
    except ssl.SSLError as err:
        raise AttestError("local-tls", f"cannot build a TLS context from this node's SVID: {err}") from err
    return context


def _load_authorities(context: ssl.SSLContext, authorities: bytes) -> None:
    """Load DER trust anchors, telling a stale OpenSSL error from a real one.

    CPython (3.11, OpenSSL 3) decides whether loading DER ``cadata`` failed by peeking at the thread's
    OpenSSL error queue, where an earlier failed TLS connection on the same thread can have left an
    error (a peer's "certificate expired" alert, say): that error is then raised here, although every
    certificate loaded. Raising cleared the queue, so a second attempt fails only for a real reason.
    Found in the end-to-end tests, after SVIDs expired during a SPIRE outage.
    """
    try:
        context.load_verify_locations(cadata=authorities)
    except ssl.SSLError:
        context.load_verify_locations(cadata=authorities)


@contextlib.contextmanager
def _memfd(data: bytes) -> Iterator[str]:
    fd = os.memfd_create("authd-svid", os.MFD_CLOEXEC)
    try:
        os.write(fd, data)
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)


def peer_chain(ssl_object: ssl.SSLObject) -> tuple[x509.Certificate, ...]:
    """The certificates the peer presented, leaf first, as sent (not as OpenSSL re-built them)."""
    # Python 3.13 made get_unverified_chain() public; 3.11 and 3.12 have it on the private object.
    source = ssl_object if hasattr(ssl_object, "get_unverified_chain") else ssl_object._sslobj  # type: ignore[attr-defined]  # noqa: SLF001
    raw = source.get_unverified_chain() or []
    try:
        return tuple(x509.load_der_x509_certificate(cert.public_bytes(_DER)) for cert in raw)
    except (ValueError, x509.InvalidVersion) as err:  # OpenSSL parsed it, cryptography is stricter
        raise AttestError(
            "malformed-certificate", f"peer presented an unparsable certificate: {err}"
        ) from err


class ContextCache:
    """Reuses a context while the SVID and the bundles it was built from are unchanged.

    Building a context parses keys and certificates (about a millisecond); a handshake should not pay
    that. The cache holds one context per identity and side (client or server): a rotated SVID or a
    bundle update replaces that identity's context, so the cache never grows with rotations. (It was
    keyed by leaf and bundles, and kept every rotated SVID's context until the size limit evicted it:
    about 130 KiB of OpenSSL memory per rotation, for over a thousand rotations.) The least recently
    used identity goes first when the cache is full, so a node with more identities than
    :attr:`max_entries` rebuilds only those not asked for lately.
    """

    def __init__(self, max_entries: int = 8) -> None:
        """Start empty; hold at most ``max_entries`` contexts (about 33 KiB each, measured)."""
        self.max_entries = max_entries
        # (identity, server side) -> (leaf fingerprint, bundle digest, the context built from them)
        self._cache: OrderedDict[tuple[SpiffeId, bool], tuple[bytes, bytes, ssl.SSLContext]] = OrderedDict()
        # The SVID store hands out the same BundleSet until bundles change: digest it once, not once
        # per handshake.
        self._digested: tuple[BundleSet, bytes] | None = None

    def get(self, svid: X509Svid, bundles: BundleSet, *, server: bool) -> ssl.SSLContext:
        """Return a context for ``svid`` and ``bundles``, building it on first use."""
        key = (svid.spiffe_id, server)
        fingerprint, digest = svid.leaf.fingerprint(hashes.SHA256()), self._digest(bundles)
        held = self._cache.get(key)
        if held is not None and held[0] == fingerprint and held[1] == digest:
            self._cache.move_to_end(key)
            return held[2]
        context = (server_context if server else client_context)(svid, bundles)
        self._cache[key] = (fingerprint, digest, context)
        self._cache.move_to_end(key)
        if len(self._cache) > self.max_entries:
            self._cache.popitem(last=False)
        return context

    def __len__(self) -> int:
        """How many contexts are held."""
        return len(self._cache)

    def _digest(self, bundles: BundleSet) -> bytes:
        if self._digested is None or self._digested[0] is not bundles:
            self._digested = (bundles, _digest(bundles))
        return self._digested[1]


def _digest(bundles: BundleSet) -> bytes:
    digest = hashlib.sha256()
    for trust_domain in sorted(bundles.bundles):
        digest.update(trust_domain.name.encode() + b"\0" + bundles.bundles[trust_domain].der())
    return digest.digest()
