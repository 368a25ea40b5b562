"""Trust-bundle maps as SPIRE sends them, parsed into one :class:`~authd.x509svid.X509Bundle` per domain.

SPIRE keys bundle maps by the trust domain's SPIFFE ID (``spiffe://example.org``); the SPIFFE spec and
other implementations use the bare name. Both are accepted. Values are concatenated DER certificates.
A map that names one trust domain twice with different contents, a key that is no trust domain, or a
bundle with no certificate makes the whole map malformed: a bundle is never half applied.
"""

from __future__ import annotations

from collections.abc import Mapping

from authd.errors import SpiffeIdError, SvidError
from authd.identity import TrustDomain
from authd.x509svid import X509Bundle


def parse_bundle(trust_domain: TrustDomain, der: bytes) -> X509Bundle:
    """Parse one trust domain's concatenated DER authorities; an empty bundle is malformed."""
    bundle = X509Bundle.parse_der(trust_domain, der)
    if not bundle.authorities:
        raise SvidError("empty-bundle", f'bundle of "{trust_domain}" has no authorities')
    return bundle


def parse_bundle_map(
    entries: Mapping[str, bytes], into: dict[TrustDomain, X509Bundle] | None = None
) -> dict[TrustDomain, X509Bundle]:
    """Parse a ``{trust domain: DER}`` map, merging into ``into`` where the same domain must agree."""
    bundles = {} if into is None else into
    for key, der in sorted(entries.items()):
        try:
            trust_domain = TrustDomain.parse(key)
        except SpiffeIdError as err:
            raise SvidError("bundle-key", f"bundle map key {key!r} is not a trust domain: {err}") from err
        if ":/" in key and key != trust_domain.id_string():
            raise SvidError("bundle-key", f"bundle map key {key!r} is a SPIFFE ID with a path")
        add_bundle(bundles, parse_bundle(trust_domain, der))
    return bundles


def add_bundle(bundles: dict[TrustDomain, X509Bundle], bundle: X509Bundle) -> None:
    """Add ``bundle``; a second, different bundle for the same trust domain is malformed."""
    existing = bundles.get(bundle.trust_domain)
    if existing is not None and existing.der() != bundle.der():
        raise SvidError("conflicting-bundles", f'two different bundles for "{bundle.trust_domain}"')
    bundles[bundle.trust_domain] = bundle
