"""Kernel TLS works in the guest: a TLS 1.3 AES-GCM-128 record layer on a loopback TCP pair, TX and RX.

The sender's socket encrypts in the kernel (``TLS_TX``); the receiver first reads the raw stream, which
must be one TLS application-data record that decrypts (here, in Python) to the plaintext, then switches
to kernel decryption (``TLS_RX``) and reads the next message as plaintext.
"""

from __future__ import annotations

import os
import socket
import struct
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

TCP_ULP = 31
SOL_TLS = 282
TLS_TX, TLS_RX = 1, 2
TLS_1_3_VERSION = 0x0304
TLS_CIPHER_AES_GCM_128 = 51
APPLICATION_DATA = 0x17
TAG = 16
FIRST = b"authd kTLS marker: first record"
SECOND = b"authd kTLS marker: decrypted by the kernel"


def crypto_info(key: bytes, iv: bytes, sequence: int) -> bytes:
    """``struct tls12_crypto_info_aes_gcm_128`` for TLS 1.3: salt and iv split the 12-byte write IV."""
    return struct.pack(
        "=HH8s16s4s8s",
        TLS_1_3_VERSION,
        TLS_CIPHER_AES_GCM_128,
        iv[4:],
        key,
        iv[:4],
        sequence.to_bytes(8, "big"),
    )


def nonce(iv: bytes, sequence: int) -> bytes:
    """RFC 8446 section 5.3: the write IV XOR the record's sequence number, left-padded."""
    return bytes(a ^ b for a, b in zip(iv, sequence.to_bytes(12, "big"), strict=True))


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        assert chunk, f"connection closed after {len(data)} of {size} bytes"
        data += chunk
    return data


def tls_stat() -> dict[str, int]:
    lines = Path("/proc/net/tls_stat").read_text().splitlines()
    return {name: int(value) for name, value in (line.split() for line in lines)}


def test_ktls_sends_records_on_the_wire_and_decrypts_them_on_receive() -> None:
    key, iv = os.urandom(16), os.urandom(12)
    with socket.create_server(("127.0.0.1", 0)) as server:
        sender = socket.create_connection(server.getsockname()[:2], timeout=10)
        receiver, _ = server.accept()
    with sender, receiver:
        receiver.settimeout(10)
        sender.setsockopt(socket.SOL_TCP, TCP_ULP, b"tls")
        sender.setsockopt(SOL_TLS, TLS_TX, crypto_info(key, iv, 0))
        sender.sendall(FIRST)

        record = recv_exactly(receiver, 5 + len(FIRST) + 1 + TAG)
        header = record[:5]
        assert header == bytes([APPLICATION_DATA, 3, 3]) + (len(FIRST) + 1 + TAG).to_bytes(2, "big")
        assert FIRST not in record
        assert AESGCM(key).decrypt(nonce(iv, 0), record[5:], header) == FIRST + bytes([APPLICATION_DATA])

        receiver.setsockopt(socket.SOL_TCP, TCP_ULP, b"tls")
        receiver.setsockopt(SOL_TLS, TLS_RX, crypto_info(key, iv, 1))
        sender.sendall(SECOND)
        assert recv_exactly(receiver, len(SECOND)) == SECOND

        stats = tls_stat()
        assert stats["TlsCurrTxSw"] >= 1, stats
        assert stats["TlsCurrRxSw"] >= 1, stats
        assert stats["TlsDecryptError"] == 0, stats
