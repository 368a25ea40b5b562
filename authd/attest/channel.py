"""One node channel session: two authd, each asking for identities and proving the ones it hosts.

Both ends are equal once TLS is up (who dialed does not matter here). Each sends a :class:`Hello` with a
fresh nonce; then each side sends :class:`Want` changes for the identities it needs from the other, and
answers every identity the other wants with a :class:`Proof` signed for the other side's nonce (see
:mod:`authd.attest.proofs`) or :class:`NotHosted`. The answers are pushed again whenever they change: a
local SVID that rotates, appears or goes away, and the local SVIDs syncing ("not hosted yet" becomes
final). Nothing is polled.

Sending is one writer task that drains a set of pending answers, so a rotation that happens twice before
it could be sent is sent once, with the latest SVID, and memory stays bounded by the number of wanted
identities.

With encryption on (a :class:`TunnelKeys`), each side also sends a :class:`WireGuardKey`: its WireGuard
public key, listen port, and a fresh ephemeral X25519 public key, once after the hellos and again for each
new generation of its key. Each side derives the pair's preshared key from its own latest ephemeral and
the peer's (:func:`authd.encryption.keys.preshared_key`, bound to both node IDs and both nonces) and hands
the peer's key and that PSK to the encryption job: peer keys are learned only here, from the node this
TLS session authenticated.

When a node's own SVID rotates, both must see the new one in a fresh handshake, and no push may wait for
it: the dialer opens the next session while this one goes on (make-before-break), and the side that
accepted asks it to with a :class:`Redial` frame (see :mod:`authd.attest.channels`).

Anything malformed from the peer raises :class:`~authd.attest.outcomes.ViolationError`, which ends the
session: among them a WireGuard key whose generation does not increase, or whose ephemeral share is a
low-order point.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

from cryptography import x509

from authd.attest import wire
from authd.attest._proto.channel_pb2 import Hello, NotHosted, Proof, Redial, Want, WireGuardKey
from authd.attest.outcomes import Outcome, ViolationError, chain_rule, not_hosted
from authd.attest.proofs import ProofChecker, binding, chain_der, sign
from authd.attest.results import Attestation, Peer
from authd.encryption.keys import KeyPair, PublicKey, preshared_key
from authd.encryption.peers import PeerKeys
from authd.errors import SvidError
from authd.histogram import Histogram
from authd.identity import SpiffeId
from authd.x509svid import BundleSet, X509Svid

MAX_THEIR_WANTS = 1 << 17
"""Identities one peer may want from this node at once; more is a violation."""
ANSWER_BATCH = 64
"""Answers written before the writer waits for the peer to take them (back-pressure)."""


class LocalIdentities(Protocol):
    """The SVIDs this node holds and the bundles it trusts (the SVID store)."""

    def own_svid(self) -> X509Svid | None:
        """The node SVID this authd runs as, if held."""
        ...

    def svid_for(self, spiffe_id: SpiffeId) -> X509Svid | None:
        """The SVID of one workload hosted on this node, if held."""
        ...

    def bundles(self) -> BundleSet:
        """Trust bundles by trust domain."""
        ...

    @property
    def synced(self) -> bool:
        """Whether the local SVIDs reflect SPIRE (so "not hosted" is final)."""
        ...


class ResultSink(Protocol):
    """Where verified proofs and answers go (the results)."""

    def proved(self, attestation: Attestation) -> None:
        """A peer proved an identity."""
        ...

    def failed(self, peer: Peer, outcome: Outcome, detail: str) -> None:
        """A peer answered, or its proof broke a rule."""
        ...


@dataclass(frozen=True, slots=True)
class Ends:
    """The two nodes of a session, as cluster state names them, the peer's address and its TLS chain."""

    local_id: SpiffeId
    peer_name: str
    peer_id: SpiffeId
    address: str
    peer_chain: tuple[x509.Certificate, ...] = ()
    """The node SVID (leaf first) the peer presented in this session's handshake, verified by then."""


@dataclass(frozen=True, slots=True)
class TunnelKey:
    """This node's WireGuard key as the channel announces it; ``generation`` grows with each new key."""

    public_key: PublicKey
    listen_port: int
    generation: int


class TunnelKeys(Protocol):
    """The encryption job: this node's WireGuard key, and where the peers' keys go."""

    def local_key(self) -> TunnelKey | None:
        """The key to announce; None while the interface is not up yet."""
        ...

    def learned(self, ends: Ends, keys: PeerKeys) -> None:
        """The peer node of ``ends`` announced ``keys`` (its public key, and the pair's PSK derived here)."""
        ...


@dataclass
class SessionStats:
    """What sessions did (one object shared by all sessions of a node)."""

    proofs_sent: int = 0
    not_hosted_sent: int = 0
    proofs_received: int = 0
    proof_latency: Histogram = field(default_factory=Histogram)
    """Seconds from asking a node for an identity to its verified proof."""


class Session:
    """One channel session over an authenticated stream; :meth:`run` until it ends."""

    def __init__(  # noqa: PLR0913 - the session's parts, the last four keyword-only
        self,
        stream: tuple[asyncio.StreamReader, asyncio.StreamWriter],
        ends: Ends,
        identities: LocalIdentities,
        results: ResultSink,
        checker: ProofChecker,
        *,
        hello_timeout: float,
        now: Callable[[], datetime],
        stats: SessionStats,
        tunnel: TunnelKeys | None = None,
        on_redial: Callable[[], None] = lambda: None,
    ) -> None:
        """Nothing is sent before :meth:`run`; what the session does is counted in ``stats``.

        ``on_redial`` is called when the peer sends a :class:`Redial`.
        """
        self.ends = ends
        self._reader, self._writer = stream
        self._identities, self._results, self._checker = identities, results, checker
        self._hello_timeout, self._now = hello_timeout, now
        self._nonce = secrets.token_bytes(wire.NONCE_BYTES)
        self._peer_nonce = b""
        self._wanted: set[SpiffeId] = set()
        self._add: set[SpiffeId] = set()
        self._drop: set[SpiffeId] = set()
        self._their_wants: set[SpiffeId] = set()
        self._to_answer: dict[SpiffeId, None] = {}
        self._wake = asyncio.Event()
        self._asked: dict[SpiffeId, float] = {}
        self.stats = stats
        self.established = False
        self._tunnel = tunnel
        self._ephemeral: KeyPair | None = None
        self._sent_generation = 0
        self._their_key: WireGuardKey | None = None
        self._closed = False
        self._on_redial = on_redial
        self._send_redial = False

    # ------------------------------------------------------------------- called by the channels

    def want(self, wanted: Collection[SpiffeId]) -> None:
        """Set the identities this side wants from the peer."""
        wanted = set(wanted)
        added, dropped = wanted - self._wanted, self._wanted - wanted
        self._wanted = wanted
        self._add = (self._add | added) - dropped
        self._drop = (self._drop | dropped) - added
        if added or dropped:
            self._wake.set()

    def ask_again(self, identities: Iterable[SpiffeId]) -> None:
        """Ask for wanted identities again: the peer answers each afresh."""
        again = {i for i in identities if i in self._wanted}
        if again:
            self._add |= again
            self._wake.set()

    def local_changed(self, spiffe_id: SpiffeId) -> None:
        """A local SVID appeared, rotated or went away: push the new answer if the peer wants it."""
        if spiffe_id in self._their_wants:
            self._to_answer[spiffe_id] = None
            self._wake.set()

    def reanswer(self, *, everything: bool) -> None:
        """Answer again every identity the peer wants that is not hosted (or every one).

        After the local SVIDs synced, "not hosted yet" becomes final; after lost SVID events, any answer
        may have changed.
        """
        for spiffe_id in self._their_wants:
            if everything or self._identities.svid_for(spiffe_id) is None:
                self._to_answer[spiffe_id] = None
        self._wake.set()

    def request_redial(self) -> None:
        """Ask the peer to open a new session (this node's SVID rotated and this side did not dial)."""
        self._send_redial = True
        self._wake.set()

    def tunnel_changed(self) -> None:
        """This node's WireGuard key has a new generation: announce it (with a fresh ephemeral share)."""
        self._wake.set()

    def close(self) -> None:
        """End the session at once (the peer sees the connection close).

        An abort, not a TLS close: a graceful shutdown would wait for the peer's close_notify, and
        a peer that never sends it would hold the socket for ssl's shutdown timeout.
        """
        self._closed = True
        self._writer.transport.abort()

    # ------------------------------------------------------------------------------- the session

    async def run(self) -> None:
        """Exchange hellos, then read and write until the stream ends; raise ViolationError on bad input."""
        self._writer.write(wire.encode(Hello(version=wire.VERSION, nonce=self._nonce)))
        async with asyncio.timeout(self._hello_timeout):
            await self._writer.drain()
            hello = await wire.read(self._reader)
        if not isinstance(hello, Hello):
            raise ViolationError("malformed-frame", "the first frame is not a hello")
        if hello.version != wire.VERSION:
            raise ViolationError("version", f"peer speaks version {hello.version}, this node {wire.VERSION}")
        self._peer_nonce = hello.nonce
        self.established = True
        self._add = set(self._wanted)
        self._drop = set()
        self._wake.set()
        tasks = {asyncio.ensure_future(self._read_loop()), asyncio.ensure_future(self._write_loop())}
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.wait(tasks)
        for task in done:
            task.result()  # the reason it ended: a ViolationError, or the connection's error
        raise ConnectionResetError("peer closed the channel")

    async def _read_loop(self) -> None:
        while True:
            try:
                body = await wire.read(self._reader)
            except asyncio.IncompleteReadError:
                return
            if isinstance(body, Want):
                self._their_want(body)
            elif isinstance(body, Proof):
                self._proof(body)
            elif isinstance(body, NotHosted):
                self._not_hosted(body)
            elif isinstance(body, WireGuardKey):
                self._wireguard_key(body)
            elif isinstance(body, Redial):
                self._on_redial()
            elif isinstance(body, Hello):
                raise ViolationError("malformed-frame", "a second hello")

    def _their_want(self, want: Want) -> None:
        for text in want.add:
            spiffe_id = wire.spiffe_id(text)
            self._their_wants.add(spiffe_id)
            self._to_answer[spiffe_id] = None
        for text in want.drop:
            spiffe_id = wire.spiffe_id(text)
            self._their_wants.discard(spiffe_id)
            self._to_answer.pop(spiffe_id, None)
        if len(self._their_wants) > MAX_THEIR_WANTS:
            raise ViolationError("too-many-wants", f"peer wants {len(self._their_wants)} identities")
        self._wake.set()

    def _proof(self, proof: Proof) -> None:
        spiffe_id = wire.spiffe_id(proof.spiffe_id)
        if spiffe_id not in self._wanted:
            return  # asked for once, no longer wanted: the answer crossed the drop
        ends = self.ends
        message = binding(self._nonce, ends.local_id, ends.peer_id, spiffe_id)
        peer = Peer(spiffe_id, ends.peer_name)
        now = self._now()
        try:
            chain = self._checker.check(
                list(proof.chain), proof.signature, message, spiffe_id, self._identities.bundles(), now
            )
        except SvidError as err:
            self._results.failed(peer, chain_rule(err), str(err))
            return
        self.stats.proofs_received += 1
        asked = self._asked.pop(spiffe_id, None)
        if asked is not None:
            self.stats.proof_latency.observe(time.monotonic() - asked)
        self._results.proved(Attestation(spiffe_id, ends.peer_name, ends.address, chain, now))

    def _not_hosted(self, answer: NotHosted) -> None:
        spiffe_id = wire.spiffe_id(answer.spiffe_id)
        if spiffe_id in self._wanted:
            self._results.failed(
                Peer(spiffe_id, self.ends.peer_name),
                not_hosted(synced=answer.synced),
                f"node {self.ends.peer_name} does not host it",
            )

    def _wireguard_key(self, key: WireGuardKey) -> None:
        if self._tunnel is None:
            return  # this node does not encrypt: nothing to learn
        known = self._their_key
        if known is not None and key.generation <= known.generation:
            raise ViolationError(
                "wireguard-generation", f"wireguard key generation {key.generation} after {known.generation}"
            )
        self._their_key = key
        self._derive()

    def _derive(self) -> None:
        """Hand the peer's key and the PSK of both latest ephemeral shares to the encryption job."""
        their, mine = self._their_key, self._ephemeral
        if their is None or mine is None or self._tunnel is None or self._closed:
            return
        try:
            shared = mine.exchange(PublicKey(their.ephemeral))
        except ValueError as err:  # a low-order point: the shared secret would be all zeros
            raise ViolationError("malformed-wireguard-key", f"unusable ephemeral key: {err}") from err
        ends = self.ends
        psk = preshared_key(shared, (ends.local_id, ends.peer_id), (self._nonce, self._peer_nonce))
        self._tunnel.learned(ends, PeerKeys(PublicKey(their.public_key), psk, their.listen_port))

    def _announce(self) -> bytes | None:
        """A WireGuardKey frame if this node's key has a generation the peer was not told yet."""
        local = self._tunnel.local_key() if self._tunnel is not None else None
        if local is None or local.generation <= self._sent_generation:
            return None
        self._ephemeral = KeyPair.generate()
        self._sent_generation = local.generation
        return wire.encode(
            WireGuardKey(
                public_key=local.public_key.raw,
                listen_port=local.listen_port,
                ephemeral=self._ephemeral.public.raw,
                generation=local.generation,
            )
        )

    async def _write_loop(self) -> None:
        writer = self._writer
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self._send_redial:
                self._send_redial = False
                writer.write(wire.encode(Redial()))
            announce = self._announce()
            if announce is not None:
                writer.write(announce)
                self._derive()  # the PSK of the new share: the peer derives the same once it reads it
                await writer.drain()
            if self._add or self._drop:
                add, drop = sorted(self._add), sorted(self._drop)
                self._add, self._drop = set(), set()
                for frame in wire.wants(add, drop):
                    writer.write(frame)
                asked = time.monotonic()
                self._asked.update(dict.fromkeys(add, asked))
                for spiffe_id in drop:
                    self._asked.pop(spiffe_id, None)
                await writer.drain()
            sent = 0
            while self._to_answer and sent < ANSWER_BATCH:
                spiffe_id = next(iter(self._to_answer))
                del self._to_answer[spiffe_id]
                writer.write(self._answer(spiffe_id))
                sent += 1
            if sent:
                await writer.drain()
            if self._to_answer:
                self._wake.set()

    def _answer(self, spiffe_id: SpiffeId) -> bytes:
        svid = self._identities.svid_for(spiffe_id)
        if svid is None:
            self.stats.not_hosted_sent += 1
            return wire.encode(NotHosted(spiffe_id=str(spiffe_id), synced=self._identities.synced))
        ends = self.ends
        message = binding(self._peer_nonce, ends.peer_id, ends.local_id, spiffe_id)
        self.stats.proofs_sent += 1
        return wire.encode(
            Proof(spiffe_id=str(spiffe_id), chain=chain_der(svid), signature=sign(svid, message))
        )
