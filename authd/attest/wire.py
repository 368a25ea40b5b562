"""Frames of the node channel: a 4-byte big-endian length, then one protobuf ``Frame`` (channel.proto).

Decoding fails closed: a length over :data:`MAX_FRAME`, bytes that do not parse, a frame with fields
this version does not understand in a known body, or an identity that is not a SPIFFE ID, are a
:class:`~authd.attest.outcomes.ViolationError`, and so is a WireGuard key whose keys are not 32 bytes or
whose port or generation is 0. A body of a kind this version does not know (a later version's
message) decodes to None and is skipped: that is how the channel grows.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence

from google.protobuf import unknown_fields
from google.protobuf.message import DecodeError

from authd.attest._proto.channel_pb2 import Frame, Hello, NotHosted, Proof, Redial, Want, WireGuardKey
from authd.attest.outcomes import ViolationError
from authd.errors import SpiffeIdError
from authd.identity import SpiffeId

VERSION = 1
NONCE_BYTES = 32
MAX_FRAME = 64 * 1024
"""A frame holds at most one proof (a chain of a few KiB) or one batch of wanted IDs."""
MAX_CHAIN = 8
"""Certificates in one proved chain: a leaf and intermediates; SPIRE uses at most a few."""
WANT_BATCH = 256
"""Identities per Want frame (SPIFFE IDs are at most 2048 bytes: 256 of them stay below MAX_FRAME)."""
WIREGUARD_KEY_BYTES = 32
"""X25519 public keys in a WireGuardKey: the node's WireGuard key and the ephemeral PSK share."""
_HEADER = 4

Body = Hello | Want | Proof | NotHosted | WireGuardKey | Redial


def encode(body: Body) -> bytes:
    """One frame with ``body``, length prefix included."""
    frame = Frame()
    if isinstance(body, Hello):
        frame.hello.CopyFrom(body)
    elif isinstance(body, Want):
        frame.want.CopyFrom(body)
    elif isinstance(body, Proof):
        frame.proof.CopyFrom(body)
    elif isinstance(body, WireGuardKey):
        frame.wireguard_key.CopyFrom(body)
    elif isinstance(body, Redial):
        frame.redial.CopyFrom(body)
    else:
        frame.not_hosted.CopyFrom(body)
    data = frame.SerializeToString()
    return len(data).to_bytes(_HEADER, "big") + data


def wants(add: Sequence[SpiffeId], drop: Sequence[SpiffeId]) -> Iterator[bytes]:
    """Want frames for these changes, :data:`WANT_BATCH` identities at most in each."""
    changes = [(str(i), True) for i in add] + [(str(i), False) for i in drop]
    for start in range(0, len(changes), WANT_BATCH):
        batch = changes[start : start + WANT_BATCH]
        yield encode(Want(add=[i for i, a in batch if a], drop=[i for i, a in batch if not a]))


def decode(data: bytes) -> Body | None:
    """The body of one frame's payload (without the length); None for a kind this version skips."""
    frame = Frame()
    try:
        frame.ParseFromString(data)
    except (DecodeError, RecursionError) as err:
        raise ViolationError("malformed-frame", f"undecodable frame: {err}") from err
    kind = frame.WhichOneof("body")
    if kind is None:
        return None
    body: Body = getattr(frame, kind)
    if len(unknown_fields.UnknownFieldSet(body)):
        raise ViolationError("malformed-frame", f"{kind} frame with fields this version does not know")
    if isinstance(body, Hello) and len(body.nonce) != NONCE_BYTES:
        raise ViolationError("malformed-frame", f"hello with a nonce of {len(body.nonce)} bytes")
    if isinstance(body, Proof) and not 0 < len(body.chain) <= MAX_CHAIN:
        raise ViolationError("malformed-frame", f"proof with {len(body.chain)} certificates")
    if isinstance(body, WireGuardKey):
        _check_wireguard_key(body)
    return body


def _check_wireguard_key(key: WireGuardKey) -> None:
    sizes = (len(key.public_key), len(key.ephemeral))
    if sizes != (WIREGUARD_KEY_BYTES, WIREGUARD_KEY_BYTES):
        raise ViolationError("malformed-wireguard-key", f"wireguard key of {sizes[0]} and {sizes[1]} bytes")
    if not 1 <= key.listen_port <= 65535:
        raise ViolationError("malformed-wireguard-key", f"wireguard listen port {key.listen_port}")
    if key.generation == 0:
        raise ViolationError("malformed-wireguard-key", "wireguard key of generation 0")


def spiffe_id(text: str) -> SpiffeId:
    """A SPIFFE ID named in a frame; a ViolationError if it is not one."""
    try:
        return SpiffeId.parse(text)
    except SpiffeIdError as err:
        raise ViolationError("malformed-id", f"frame names {text[:80]!r}: {err}") from err


async def read(reader: asyncio.StreamReader) -> Body | None:
    """Read and decode the next frame; IncompleteReadError at the end of the stream."""
    size = int.from_bytes(await reader.readexactly(_HEADER), "big")
    if size > MAX_FRAME:
        raise ViolationError("oversize-frame", f"frame of {size} bytes (at most {MAX_FRAME})")
    return decode(await reader.readexactly(size))
