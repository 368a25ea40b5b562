from __future__ import annotations

import base64
import subprocess
from pathlib import Path

import pytest

from authd.encryption.keys import KEY_FILE, KeyPair, PublicKey, load_or_create, preshared_key
from authd.errors import EncryptionError
from tests.fakes.cluster import sid


def test_public_key_matches_wg_pubkey() -> None:
    pair = KeyPair.generate()
    private = base64.b64encode(pair.private_raw()).decode()
    result = subprocess.run(["wg", "pubkey"], input=private, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == pair.public.base64()
    assert pair.public.hex() == pair.public.raw.hex()


def test_key_file_is_made_0600_and_read_back(tmp_path: Path) -> None:
    first = load_or_create(tmp_path / "state")
    path = tmp_path / "state" / KEY_FILE
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.read_bytes() == first.private_raw()
    assert load_or_create(tmp_path / "state").public == first.public
    assert [p.name for p in path.parent.iterdir()] == [KEY_FILE]


def test_key_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    load_or_create(tmp_path)
    (tmp_path / KEY_FILE).chmod(0o640)
    with pytest.raises(EncryptionError, match="only its owner can read"):
        load_or_create(tmp_path)


def test_truncated_key_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / KEY_FILE).write_bytes(b"short")
    (tmp_path / KEY_FILE).chmod(0o600)
    with pytest.raises(EncryptionError, match="32 bytes, not 5"):
        load_or_create(tmp_path)


def test_public_key_must_have_32_bytes() -> None:
    with pytest.raises(EncryptionError):
        PublicKey(b"\0" * 31)


def test_repr_shows_only_the_public_half() -> None:
    pair = KeyPair.generate()
    assert pair.private_raw().hex() not in repr(pair)
    assert pair.public.base64() in repr(pair)


def test_both_ends_derive_the_same_psk_and_it_is_bound_to_the_session() -> None:
    a, b = KeyPair.generate(), KeyPair.generate()
    ends = (sid("authd/node-a"), sid("authd/node-b"))
    nonces = (b"\1" * 32, b"\2" * 32)
    at_a = preshared_key(a.exchange(b.public), ends, nonces)
    at_b = preshared_key(b.exchange(a.public), ends[::-1], nonces[::-1])
    assert at_a == at_b
    assert len(at_a) == 32
    assert preshared_key(a.exchange(b.public), ends, (b"\1" * 32, b"\3" * 32)) != at_a
    assert preshared_key(a.exchange(b.public), (ends[0], sid("authd/node-c")), nonces) != at_a
