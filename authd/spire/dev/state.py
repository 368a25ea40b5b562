"""dev-spire's persistent state: CA keys and registration entries in one JSON file, written atomically.

``DIR/server/state.json`` (mode 0600, it holds CA private keys) is replaced whole on every change: a
temporary file in the same directory, fsync, rename. A restart resumes the same CAs and entries, so
bundles and identities survive it exactly as with a real SPIRE server's datastore and key manager.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from authd.errors import SpireError
from authd.identity import SpiffeId, TrustDomain
from authd.spire.dev.ca import CertificateAuthority
from authd.x509svid import X509Svid

STATE_VERSION = 1


def state_path(directory: Path) -> Path:
    """Where the state file of a dev-spire directory lives."""
    return directory / "server" / "state.json"


def load_state(path: Path) -> dict[str, Any] | None:
    """Read the state file; None if there is none yet."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    state: dict[str, Any] = json.loads(text)
    if state.get("version") != STATE_VERSION:
        raise SpireError(
            f"dev-spire: {path}: unsupported state version {state.get('version')!r}", retryable=False
        )
    return state


def save_state(path: Path, state: dict[str, Any]) -> None:
    """Replace the state file atomically (readers see the old or the new file, never a torn one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = json.dumps({**state, "version": STATE_VERSION}, indent=1, sort_keys=True).encode()
    fd, temporary = tempfile.mkstemp(prefix=".state.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        Path(temporary).replace(path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def mint_svid(directory: Path, spiffe_id: SpiffeId, ttl: dt.timedelta) -> X509Svid:
    """Sign an SVID with the current CA of ``spiffe_id``'s trust domain, as stored under ``directory``.

    For tests that need a peer in another (federated) trust domain, which no dev-spire agent serves.
    """
    state = load_state(state_path(directory))
    authorities = (state or {}).get("authorities", {})
    trust_domain = spiffe_id.trust_domain
    if trust_domain.name not in authorities:
        raise SpireError(f"dev-spire: {directory} has no CA for trust domain {trust_domain}", retryable=False)
    saved = authorities[trust_domain.name]
    ca = CertificateAuthority.from_state(
        TrustDomain(trust_domain.name), dt.timedelta(seconds=saved["ttl_s"]), saved
    )
    return ca.mint(spiffe_id, ttl, dt.datetime.now(dt.UTC))
