"""SPIFFE IDs and trust domains, parsed exactly as the SPIFFE-ID specification says; pure.

Stricter than some SDKs on purpose: the scheme and the trust domain must already be lowercase (no case
folding), percent-encoding is never decoded, and a trailing newline is a bad character, not whitespace.
Also here: SPIRE selectors, the deterministic TLS server name (SNI) under which an identity is
attested, and the SPIFFE ID convention for authd's own node identity.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import re
from dataclasses import dataclass

from authd.errors import SpiffeIdError

SCHEME_PREFIX = "spiffe://"
MAX_ID_BYTES = 2048
MAX_TRUST_DOMAIN_BYTES = 255

_TRUST_DOMAIN_CHARS = re.compile(r"[a-z0-9._-]+")
_SEGMENT_CHARS = re.compile(r"[a-zA-Z0-9._-]+")

SNI_SUFFIX = ".authd.internal"


@dataclass(frozen=True, slots=True, order=True)
class TrustDomain:
    """A SPIFFE trust domain name such as ``example.org``."""

    name: str

    @classmethod
    def parse(cls, text: str) -> TrustDomain:
        """Parse a bare trust domain name, or take the trust domain of a ``spiffe://`` ID."""
        if ":/" in text:
            return SpiffeId.parse(text).trust_domain
        if not text:
            raise SpiffeIdError("spiffeid: trust domain is missing")
        _check_trust_domain(text)
        return cls(text)

    def id_string(self) -> str:
        """The trust domain as an ID, ``spiffe://example.org``: SPIRE's key for bundles."""
        return SCHEME_PREFIX + self.name

    def __str__(self) -> str:
        """Return the bare name."""
        return self.name


@dataclass(frozen=True, slots=True, order=True)
class SpiffeId:
    """A parsed SPIFFE ID; ``path`` is empty or starts with ``/``."""

    trust_domain: TrustDomain
    path: str

    @classmethod
    def parse(cls, text: str) -> SpiffeId:
        """Parse ``spiffe://<trust-domain><path>``; raise SpiffeIdError naming the rule broken."""
        if not text:
            raise SpiffeIdError("spiffeid: cannot be empty")
        _check_id_length(text)
        if not text.startswith(SCHEME_PREFIX):
            raise SpiffeIdError("spiffeid: scheme is missing or invalid")
        rest = text[len(SCHEME_PREFIX) :]
        slash = rest.find("/")
        domain, path = (rest, "") if slash < 0 else (rest[:slash], rest[slash:])
        if not domain:
            raise SpiffeIdError("spiffeid: trust domain is missing")
        _check_trust_domain(domain)
        validate_path(path)
        return cls(TrustDomain(domain), path)

    @classmethod
    def from_parts(cls, trust_domain: TrustDomain, path: str) -> SpiffeId:
        """Build an ID from a trust domain and a path, validating the path and the ID's length."""
        validate_path(path)
        spiffe_id = cls(trust_domain, path)
        _check_id_length(str(spiffe_id))
        return spiffe_id

    def member_of(self, trust_domain: TrustDomain) -> bool:
        """Whether this ID belongs to ``trust_domain``."""
        return self.trust_domain == trust_domain

    @property
    def is_root(self) -> bool:
        """Whether the path is empty (the ID names the trust domain itself; never a workload)."""
        return not self.path

    def __str__(self) -> str:
        """Return the canonical URI form."""
        return f"{SCHEME_PREFIX}{self.trust_domain.name}{self.path}"


def validate_path(path: str) -> None:
    """Check a SPIFFE ID path: empty, or ``/``-separated segments of letters, digits, ``.``, ``-``, ``_``."""
    if not path:
        return
    if not path.startswith("/"):
        raise SpiffeIdError("spiffeid: path must have a leading slash")
    segments = path[1:].split("/")
    for index, segment in enumerate(segments):
        if not segment:
            if index == len(segments) - 1:
                raise SpiffeIdError("spiffeid: path cannot have a trailing slash")
            raise SpiffeIdError("spiffeid: path cannot contain empty segments")
        if segment in (".", ".."):
            raise SpiffeIdError("spiffeid: path cannot contain dot segments")
        if not _SEGMENT_CHARS.fullmatch(segment):
            raise SpiffeIdError(
                "spiffeid: path segment characters are limited to letters, numbers, dots, dashes, "
                "and underscores"
            )


def _check_id_length(text: str) -> None:
    if _utf8_length(text) > MAX_ID_BYTES:
        raise SpiffeIdError(f"spiffeid: longer than {MAX_ID_BYTES} bytes")


def _check_trust_domain(domain: str) -> None:
    if _utf8_length(domain) > MAX_TRUST_DOMAIN_BYTES:
        raise SpiffeIdError(f"spiffeid: trust domain longer than {MAX_TRUST_DOMAIN_BYTES} bytes")
    if not _TRUST_DOMAIN_CHARS.fullmatch(domain):
        raise SpiffeIdError(
            "spiffeid: trust domain characters are limited to lowercase letters, numbers, dots, dashes, "
            "and underscores"
        )


def _utf8_length(text: str) -> int:
    # Lone surrogates are passed through so that they reach the character check and are refused
    # there as SpiffeIdError; the strict codec would raise UnicodeEncodeError out of the parser.
    return len(text.encode("utf-8", "surrogatepass"))


@dataclass(frozen=True, slots=True, order=True)
class Selector:
    """A SPIRE selector such as ``unix:uid:1000``: a type (``unix``) and a value (``uid:1000``)."""

    type: str
    value: str

    @classmethod
    def parse(cls, text: str) -> Selector:
        """Parse ``<type>:<value>``; the type has no colon, neither part is empty (as SPIRE requires)."""
        kind, colon, value = text.partition(":")
        if not colon or not kind or not value:
            raise SpiffeIdError(f'selector: want "<type>:<value>", got {text!r}')
        return cls(kind, value)

    def __str__(self) -> str:
        """Return ``<type>:<value>``."""
        return f"{self.type}:{self.value}"


def node_id(trust_domain: TrustDomain, node_name: str) -> SpiffeId:
    """The SPIFFE ID authd on ``node_name`` runs as, by convention ``spiffe://<td>/authd/<node>``."""
    return SpiffeId.from_parts(trust_domain, f"/authd/{node_name}")


@functools.lru_cache(maxsize=65536)
def sni_for(spiffe_id: SpiffeId) -> str:
    """The TLS server name under which ``spiffe_id`` is attested: a valid DNS name, stable, one per ID.

    SPIFFE paths allow characters and lengths DNS names do not, so the name is a 160-bit digest of the ID
    in lowercase base32 (a valid DNS label) under a reserved suffix. The digest also keeps the ClientHello,
    which is sent in clear, from spelling out which workload is being attested.
    """
    digest = hashlib.sha256(str(spiffe_id).encode()).digest()[:20]
    label = base64.b32encode(digest).decode().lower()
    return label + SNI_SUFFIX
