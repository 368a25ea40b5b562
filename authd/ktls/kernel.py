"""Kernel TLS on a socket: a finished :class:`~authd.ktls.session.Session`'s keys, TX and RX.

After the user-space handshake, ``setsockopt(SOL_TCP, TCP_ULP, "tls")`` makes the socket a kTLS socket,
and ``setsockopt(SOL_TLS, TLS_TX | TLS_RX, crypto_info)`` gives the kernel each direction's key, IV and
the sequence number of the next record (include/uapi/linux/tls.h, Documentation/networking/tls.rst).
From then on the kernel frames, encrypts and decrypts application data itself: ``send`` and ``recv`` on
the socket carry plaintext, and the wire carries only TLS application-data records.

The layouts, for TLS 1.3 (``version`` 0x0304): AES-GCM puts the first 4 bytes of the 12-byte IV in
``salt`` and the last 8 in ``iv``; ChaCha20-Poly1305 takes the whole IV in ``iv`` and has no salt.

Traps: the sequence numbers must be the ones the user-space TLS library would have used next (0 after a
:func:`~authd.ktls.session.handshake`, which sends no tickets and no data); on kernels before 6.14 a
direction's keys can be set once, so a peer's KeyUpdate breaks RX (EBADMSG); nothing in authd sends
one, and rekeying (KeyUpdate on 6.14 and later, or a new session) is not built yet. A failure half-way
would leave a socket that might still carry plaintext: :func:`install` shuts the socket down before it
raises, so it fails closed.
"""

from __future__ import annotations

import contextlib
import errno
import socket
import struct
from pathlib import Path

from authd.errors import KtlsError
from authd.ktls.keys import CipherSuite, TrafficKeys
from authd.ktls.session import Session
from authd.ktls.support import TCP_ULP

SOL_TLS = 282
TLS_TX = 1
TLS_RX = 2
TLS_1_3_VERSION = 0x0304
TLS_STAT = Path("/proc/net/tls_stat")

# enum values of include/uapi/linux/tls.h, and each struct's layout (native order, no padding).
_CIPHER_TYPES = {
    CipherSuite.AES_128_GCM_SHA256: 51,  # TLS_CIPHER_AES_GCM_128, struct tls12_crypto_info_aes_gcm_128
    CipherSuite.AES_256_GCM_SHA384: 52,  # TLS_CIPHER_AES_GCM_256, struct tls12_crypto_info_aes_gcm_256
    CipherSuite.CHACHA20_POLY1305_SHA256: 54,  # TLS_CIPHER_CHACHA20_POLY1305
}
_AES_GCM_128 = struct.Struct("=HH8s16s4s8s")  # version, cipher_type, iv, key, salt, rec_seq: 40 bytes
_AES_GCM_256 = struct.Struct("=HH8s32s4s8s")  # 56 bytes
_CHACHA20_POLY1305 = struct.Struct("=HH12s32s8s")  # version, cipher_type, iv, key, rec_seq: 56 bytes


def crypto_info(keys: TrafficKeys, sequence: int) -> bytes:
    """The ``tls12_crypto_info_*`` struct of one direction, starting at record ``sequence``."""
    cipher = _CIPHER_TYPES[keys.suite]
    rec_seq = sequence.to_bytes(8, "big")
    if keys.suite is CipherSuite.CHACHA20_POLY1305_SHA256:
        return _CHACHA20_POLY1305.pack(TLS_1_3_VERSION, cipher, keys.iv, keys.key, rec_seq)
    layout = _AES_GCM_128 if keys.suite is CipherSuite.AES_128_GCM_SHA256 else _AES_GCM_256
    return layout.pack(TLS_1_3_VERSION, cipher, keys.iv[4:], keys.key, keys.iv[:4], rec_seq)


def install(sock: socket.socket, session: Session) -> None:
    """Hand both directions of ``session`` to kernel TLS on ``sock``; shut it down and raise on failure."""
    step = 'TCP_ULP "tls"'
    try:
        sock.setsockopt(socket.IPPROTO_TCP, TCP_ULP, b"tls")
        step = "TLS_TX"
        sock.setsockopt(SOL_TLS, TLS_TX, crypto_info(session.tx, session.tx_sequence))
        step = "TLS_RX"
        sock.setsockopt(SOL_TLS, TLS_RX, crypto_info(session.rx, session.rx_sequence))
    except OSError as err:
        name = errno.errorcode.get(err.errno or 0, str(err.errno))
        with contextlib.suppress(OSError):  # already disconnected: nothing can pass on it either way
            sock.shutdown(socket.SHUT_RDWR)
        raise KtlsError(f"ktls: cannot set {step} on the session with {session.peer}: {name}") from err


def tls_stat(path: Path = TLS_STAT) -> dict[str, int]:
    """The kernel's TLS counters (``TlsCurrTxSw``, ``TlsRxSw``, ``TlsDecryptError``...); empty without TLS."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    counters: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit():
            counters[parts[0]] = int(parts[1])
    return counters
