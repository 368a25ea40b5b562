"""The key schedule against RFC 8448 section 3 (the simple 1-RTT handshake, TLS_AES_128_GCM_SHA256)."""

from __future__ import annotations

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from authd.errors import KtlsError
from authd.ktls.keys import CipherSuite, hkdf_expand_label, next_traffic_secret, traffic_keys


def h(text: str) -> bytes:
    return bytes.fromhex(text.replace(" ", ""))


SUITE = CipherSuite.AES_128_GCM_SHA256
# (traffic secret, key, iv) for each direction and phase, as RFC 8448 section 3 lists them.
VECTORS = {
    "server handshake": (
        "b67b7d690cc16c4e75e54213cb2d37b4e9c912bcded9105d42befd59d391ad38",
        "3fce516009c21727d0f2e4e86ee403bc",
        "5d313eb2671276ee13000b30",
    ),
    "server application": (
        "a11af9f05531f856ad47116b45a950328204b4f44bfb6b3a4b4f1f3fcb631643",
        "9f02283b6c9c07efc26bb9f2ac92e356",
        "cf782b88dd83549aadf1e984",
    ),
    "client application": (
        "9e40646ce79a7f9dc05af8889bce6552875afa0b06df0087f792ebb7c17504a5",
        "17422dda596ed5d9acd890e3c63f5051",
        "5b78923dee08579033e523d9",
    ),
}
PLAINTEXT = bytes(range(0x32))  # the application data both sides send in RFC 8448 section 3
# The records carrying it: the client's is its first (sequence 0); the server's is its second, after
# the NewSessionTicket record (sequence 1).
CLIENT_RECORD = h(
    "17 03 03 00 43 a2 3f 70 54 b6 2c 94 d0 af fa fe 82 28 ba 55 cb ef ac ea 42 f9 14 aa 66 bc ab 3f 2b"
    "98 19 a8 a5 b4 6b 39 5b d5 4a 9a 20 44 1e 2b 62 97 4e 1f 5a 62 92 a2 97 70 14 bd 1e 3d ea e6 3a ee"
    "bb 21 69 49 15 e4"
)
SERVER_RECORD = h(
    "17 03 03 00 43 2e 93 7e 11 ef 4a c7 40 e5 38 ad 36 00 5f c4 a4 69 32 fc 32 25 d0 5f 82 aa 1b 36 e3"
    "0e fa f9 7d 90 e6 df fc 60 2d cb 50 1a 59 a8 fc c4 9c 4b f2 e5 f0 a2 1c 00 47 c2 ab f3 32 54 0d d0"
    "32 e1 67 c2 95 5d"
)


@pytest.mark.parametrize("phase", sorted(VECTORS))
def test_keys_and_ivs_match_rfc8448(phase: str) -> None:
    secret, key, iv = VECTORS[phase]
    keys = traffic_keys(SUITE, h(secret))
    assert keys.key.hex() == key
    assert keys.iv.hex() == iv


@pytest.mark.parametrize(
    ("phase", "record", "sequence"),
    [("client application", CLIENT_RECORD, 0), ("server application", SERVER_RECORD, 1)],
    ids=["client", "server"],
)
def test_derived_keys_open_the_rfc8448_records(phase: str, record: bytes, sequence: int) -> None:
    keys = traffic_keys(SUITE, h(VECTORS[phase][0]))
    inner = AESGCM(keys.key).decrypt(keys.nonce(sequence), record[5:], record[:5])
    assert inner == PLAINTEXT + b"\x17"  # content, then the inner type: application data
    with pytest.raises(InvalidTag):
        AESGCM(keys.key).decrypt(keys.nonce(sequence + 1), record[5:], record[:5])


def test_nonce_is_the_iv_xor_the_sequence() -> None:
    keys = traffic_keys(SUITE, h(VECTORS["client application"][0]))
    assert keys.nonce(0) == keys.iv
    assert keys.nonce(1)[:11] == keys.iv[:11]
    assert keys.nonce(1)[11] == keys.iv[11] ^ 1
    assert keys.nonce(0x0102)[10:] == bytes([keys.iv[10] ^ 1, keys.iv[11] ^ 2])
    with pytest.raises(KtlsError, match="out of range"):
        keys.nonce(1 << 64)


def test_key_update_and_suite_lengths() -> None:
    secret = h(VECTORS["client application"][0])
    updated = next_traffic_secret(SUITE, secret)
    # By definition: HKDF-Expand-Label(secret, "traffic upd", "", Hash.length).
    assert updated == hkdf_expand_label(SUITE, secret, "traffic upd", b"", 32)
    assert traffic_keys(SUITE, updated).key != traffic_keys(SUITE, secret).key
    big = CipherSuite.AES_256_GCM_SHA384
    keys = traffic_keys(big, bytes(48))
    assert (len(keys.key), len(keys.iv), len(next_traffic_secret(big, bytes(48)))) == (32, 12, 48)
    assert len(traffic_keys(CipherSuite.CHACHA20_POLY1305_SHA256, bytes(32)).key) == 32


def test_secrets_of_the_wrong_length_and_unknown_suites_are_refused() -> None:
    with pytest.raises(KtlsError, match="TLS_AES_256_GCM_SHA384 traffic secret has 48 bytes, got 32"):
        traffic_keys(CipherSuite.AES_256_GCM_SHA384, bytes(32))
    with pytest.raises(KtlsError, match="TLS_AES_128_CCM_SHA256 has no kernel TLS support"):
        CipherSuite.named("TLS_AES_128_CCM_SHA256")
    assert CipherSuite.named("TLS_AES_256_GCM_SHA384") is CipherSuite.AES_256_GCM_SHA384
    assert "key" not in repr(traffic_keys(SUITE, bytes(32))).lower().replace("traffickeys", "")
