"""A node no authd of the cluster runs, played by a test: authd's own channel session behind a TLS listener.

It accepts channels from nodes whose SVIDs chain to its bundles, answers every identity they want with
a proof (or "not hosted") through :class:`authd.attest.channel.Session`, and otherwise stays silent: its
SVIDs never rotate and it wants nothing. A node of a federated trust domain, say, which dev-spire's
agents cannot play.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from authd.attest.channel import Ends, Session, SessionStats
from authd.attest.outcomes import Outcome, ViolationError
from authd.attest.proofs import ProofChecker
from authd.attest.results import Attestation, Peer
from authd.attest.tls import peer_chain, server_context
from authd.datapath.netns import run_in_netns
from authd.errors import SvidError
from authd.identity import SpiffeId
from authd.x509svid import BundleSet, X509Svid, verify_chain
from tests.fakes.identities import FakeIdentities


class _Hosted(FakeIdentities):
    """The foreign node's SVIDs as its sessions see them: whatever it hosts at the moment."""

    def __init__(self, node: ForeignNode) -> None:
        super().__init__(node.own, trusted=node.bundles)
        self._node = node

    def svid_for(self, spiffe_id: SpiffeId) -> X509Svid | None:
        return next((svid for svid in self._node.hosted if svid.spiffe_id == spiffe_id), None)


class _NoWants:
    """The results of a node that wants nothing: anything reported is a test failure."""

    def proved(self, attestation: Attestation) -> None:
        raise AssertionError(f"the foreign node wants nothing, got a proof of {attestation.remote_id}")

    def failed(self, peer: Peer, outcome: Outcome, detail: str) -> None:
        raise AssertionError(f"the foreign node wants nothing, got {outcome.reason} for {peer}: {detail}")


@dataclass
class ForeignNode:
    """Its node SVID, the SVIDs it hosts and the bundles it trusts."""

    own: X509Svid
    hosted: list[X509Svid]
    bundles: BundleSet
    sessions: list[Session] = field(default_factory=list)
    stats: SessionStats = field(default_factory=SessionStats)
    _handlers: list[asyncio.Task[None]] = field(default_factory=list)
    _loop: asyncio.AbstractEventLoop | None = None

    def host(self, svid: X509Svid) -> None:
        """Host ``svid`` from now on, in place of the one of its ID, and push it to every session."""

        def swap() -> None:
            self.hosted = [held for held in self.hosted if held.spiffe_id != svid.spiffe_id] + [svid]
            for session in self.sessions:
                session.local_changed(svid.spiffe_id)

        assert self._loop is not None
        self._loop.call_soon_threadsafe(swap)

    @contextlib.contextmanager
    def serving(self, netns: Path, address: str, port: int) -> Iterator[None]:
        """Listen on ``address:port`` inside ``netns`` until the block ends."""
        loop = self._loop = asyncio.new_event_loop()
        started = threading.Event()
        stop = asyncio.Event()
        failure: list[BaseException] = []

        def run() -> None:
            try:
                run_in_netns(
                    netns, lambda: loop.run_until_complete(self._serve(address, port, started, stop))
                )
            except BaseException as err:  # noqa: BLE001 - reported to the test below
                failure.append(err)
                started.set()

        thread = threading.Thread(target=run, name="foreign-node")
        thread.start()
        try:
            started.wait(10)
            if failure:
                raise failure[0]
            yield
        finally:
            loop.call_soon_threadsafe(stop.set)
            thread.join(10)
            loop.close()

    async def _serve(self, address: str, port: int, started: threading.Event, stop: asyncio.Event) -> None:
        context = server_context(self.own, self.bundles)
        server = await asyncio.start_server(self._channel, address, port, ssl=context)
        started.set()
        try:
            await stop.wait()
        finally:
            server.close()
            for session in self.sessions:
                session.close()
            await asyncio.gather(*self._handlers, return_exceptions=True)
            await server.wait_closed()

    async def _channel(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.append(task)
        peer: list[SpiffeId] = []
        now = dt.datetime.now(dt.UTC)
        try:
            verify_chain(
                peer_chain(writer.get_extra_info("ssl_object")), self.bundles, at=now, authorize=peer.append
            )
        except SvidError:
            writer.transport.abort()
            return
        address = writer.get_extra_info("peername")[0]
        identities = _Hosted(self)
        session = Session(
            (reader, writer),
            Ends(
                self.own.spiffe_id,
                peer[0].path.rsplit("/", 1)[1],
                peer[0],
                str(address),
            ),
            identities,
            _NoWants(),
            ProofChecker(),
            hello_timeout=5,
            now=lambda: dt.datetime.now(dt.UTC),
            stats=self.stats,
        )
        self.sessions.append(session)
        with contextlib.suppress(ViolationError, ConnectionError, ssl.SSLError, asyncio.IncompleteReadError):
            await session.run()
