"""Building TLS contexts from SVIDs: immune to stale OpenSSL errors, and failures are AttestErrors."""

from __future__ import annotations

import ctypes
import dataclasses
import datetime as dt
import ssl

import pytest

from authd.attest.tls import client_context, server_context
from authd.errors import AttestError
from authd.x509svid import BundleSet
from tests.fakes.ca import LeafOptions, TestCA

NOW = dt.datetime.now(dt.UTC)
LIVE = LeafOptions(not_before=NOW - dt.timedelta(minutes=1), not_after=NOW + dt.timedelta(hours=1))
SSL_LIB = 20  # ERR_LIB_SSL
SSL_R_SSLV3_ALERT_CERTIFICATE_EXPIRED = 1045


def leave_a_stale_openssl_error() -> None:
    """Put an error on this thread's OpenSSL error queue, as a failed TLS connection can leave one."""
    if not ssl.OPENSSL_VERSION.startswith("OpenSSL 3."):
        pytest.skip(f"the error-queue API used here is OpenSSL 3's, not {ssl.OPENSSL_VERSION}")
    try:
        libcrypto = ctypes.CDLL("libcrypto.so.3")  # the instance the ssl module already loaded
    except OSError:
        pytest.skip("libcrypto.so.3 is not loadable by name")
    libcrypto.ERR_new()
    libcrypto.ERR_set_debug(b"test", 0, b"test")
    libcrypto.ERR_set_error(SSL_LIB, SSL_R_SSLV3_ALERT_CERTIFICATE_EXPIRED, None)
    assert libcrypto.ERR_peek_last_error() != 0


def test_a_stale_openssl_error_does_not_fail_building_contexts() -> None:
    # Found in the end-to-end tests: after a peer's "certificate expired" alert, building the next
    # context raised that alert from load_verify_locations, escaped the attestation schedule as an
    # SSLError and stopped it.
    ca = TestCA.create("example.org")
    svid, bundles = ca.mint("spiffe://example.org/authd/node-a", LIVE), BundleSet.of([ca.bundle()])

    leave_a_stale_openssl_error()
    assert client_context(svid, bundles).minimum_version is ssl.TLSVersion.TLSv1_3
    leave_a_stale_openssl_error()
    assert server_context(svid, bundles).verify_mode is ssl.CERT_REQUIRED


def test_a_context_that_cannot_be_built_is_a_transient_attest_error() -> None:
    ca = TestCA.create("example.org")
    svid = ca.mint("spiffe://example.org/authd/node-a", LIVE)
    other = ca.mint("spiffe://example.org/authd/node-b", LIVE)
    mismatched = dataclasses.replace(svid, private_key=other.private_key)

    with pytest.raises(AttestError) as raised:
        client_context(mismatched, BundleSet.of([ca.bundle()]))

    assert raised.value.reason == "local-tls"
