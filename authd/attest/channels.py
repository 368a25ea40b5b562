"""The node channels: one long-lived session per pair of nodes that share policy, kept up.

Which nodes: :func:`policy_peers`, the nodes that host an identity some rule pairs with an identity of
this node. Both nodes compute it from the same cluster state, so both agree that they need a channel,
and :func:`dials` picks who opens it: the node whose node SPIFFE ID sorts first. That side dials the
peer's addresses in cluster state's order (the next address only if one cannot be reached), checks that
the server is exactly the node ID cluster state gives the peer, and dials again with the shared backoff
after a loss (reset once a session was up; none at all after a session that had lasted, such as one the
peer closed because its SVID rotated). The other side accepts: :class:`~authd.attest.admission.
Admission` decides on the bare socket, then TLS, then the client must be exactly the node SVID of a node
in cluster state. A newer session from a node replaces an older one (the peer restarted).

With encryption on, this node keeps a channel with every node in cluster state, policy or not: the
WireGuard keys of each peer travel on it (:class:`~authd.attest.channel.TunnelKeys`).

When a node's own SVID rotates, both sides must see the new SVID in a fresh handshake, and nothing may
wait for it: the dialer opens the next session while the current one goes on carrying pushes, and
closes the old one once the new one is up (make-before-break). The side that accepted sends a
``Redial`` frame instead, and closes the session itself if no new one arrives within the handshake
timeout. A dialer honours a redial request once a session has lasted :data:`STEADY_SESSION`, so a
peer cannot make it dial in a loop. Failures are counted by reason and logged at a limited rate.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import socket
import ssl
import time
from collections import Counter
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

import structlog
from cryptography import x509

from authd.attest.admission import Admission
from authd.attest.channel import Ends, LocalIdentities, ResultSink, Session, SessionStats, TunnelKeys
from authd.attest.outcomes import ViolationError
from authd.attest.proofs import ProofChecker
from authd.attest.results import Peer, Target
from authd.attest.tls import ContextCache, peer_chain
from authd.backoff import Backoff, BackoffFactory
from authd.cluster.model import ClusterState
from authd.config.model import AttestConfig
from authd.errors import AttestError, SvidError
from authd.identity import SpiffeId
from authd.x509svid import BundleSet, authorize_id, verify_chain

log = structlog.get_logger(__name__)

LOG_INTERVAL = 10.0
"""Seconds between two log lines for failures of the same reason (every one is counted)."""
STEADY_SESSION = 1.0
"""Seconds a dialed session must have lasted for its end to be followed by a new dial at once; a shorter
one (a peer that accepts and hangs up) is dialed again after the backoff, so that it cannot make a loop."""
_SESSION_ENDS = (AttestError, OSError, ssl.SSLError, TimeoutError, asyncio.IncompleteReadError)
"""How a session or a dial ends short of cancellation: each is counted as the channel's loss."""

KEEPALIVE = (10, 5, 3)
"""TCP keepalive (idle s, interval s, probes): a peer gone without a word is noticed within 25 s."""


def policy_peers(state: ClusterState, local_node: str) -> frozenset[str]:
    """The nodes hosting an identity that a rule pairs with an identity on ``local_node``, either way."""
    local_ids = {endpoint.spiffe_id for endpoint in state.endpoints_on(local_node)}
    if not local_ids:
        return frozenset()
    peers: set[str] = set()
    for rule in state.rules:
        sources, destinations = state.matching(rule.source), state.matching(rule.destination)
        for mine, theirs in ((sources, destinations), (destinations, sources)):
            if local_ids & mine:
                peers.update(node.name for spiffe_id in theirs for node in state.where(spiffe_id))
    peers.discard(local_node)
    return frozenset(peers)


def dials(local_id: SpiffeId, peer_id: SpiffeId) -> bool:
    """Whether this node (``local_id``) opens the channel to ``peer_id``: the first by SPIFFE ID does."""
    return str(local_id) < str(peer_id)


@dataclass
class ChannelStats:
    """Channels opened by side, ended and refused by reason, and what was exchanged over them."""

    opened: Counter[str] = field(default_factory=Counter)
    ended: Counter[str] = field(default_factory=Counter)
    refused: Counter[str] = field(default_factory=Counter)
    exchanged: SessionStats = field(default_factory=SessionStats)


@dataclass
class _Link:
    """This node's side of the channel with one peer node."""

    name: str
    node_id: SpiffeId
    addresses: tuple[str, ...]
    port: int
    backoff: Backoff
    dialer: bool
    wanted: frozenset[SpiffeId] = frozenset()
    session: Session | None = None
    task: asyncio.Task[None] | None = None
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    renew: bool = False
    """Open the next session before closing the current one (a node SVID rotated)."""


class Channels:
    """Every channel of this node: dialing, accepting, and routing wants and local changes to them."""

    def __init__(
        self,
        node_name: str,
        identities: LocalIdentities,
        results: ResultSink,
        config: AttestConfig,
        backoff: BackoffFactory,
        *,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
        clock: Callable[[], float] = time.monotonic,
        tunnel: TunnelKeys | None = None,
    ) -> None:
        """Nothing is dialed before :meth:`run`, nothing accepted before :meth:`serve`.

        ``tunnel``: the encryption job, whose keys every session exchanges (a channel to every node).
        """
        self._node = node_name
        self._identities = identities
        self._results = results
        self._config = config
        self._backoff = backoff
        self._now = now
        self._clock = clock
        self._timeout = config.handshake_timeout.total_seconds()
        self._connect_timeout = config.client_timeout.total_seconds()
        self._admission = Admission(config, clock)
        self._contexts = ContextCache()
        self._checker = ProofChecker()
        self._state: ClusterState | None = None
        self._local_id: SpiffeId | None = None
        self._local_addresses: tuple[str, ...] = ()
        self._links: dict[str, _Link] = {}
        self._wants: dict[str, frozenset[SpiffeId]] = {}
        self._group: asyncio.TaskGroup | None = None
        self._context = contextvars.copy_context()
        self._logged_at: dict[str, float] = {}
        self._unlogged: Counter[str] = Counter()
        self._tunnel = tunnel
        self.stats = ChannelStats()

    # ------------------------------------------------------------------------------------- inputs

    def cluster_changed(self, state: ClusterState) -> None:
        """A new cluster state: which nodes to keep channels with, at which addresses and IDs."""
        self._state = state
        local = state.node(self._node)
        self._local_id = local.spiffe_id if local is not None else None
        self._local_addresses = tuple(str(a) for a in local.addresses) if local is not None else ()
        others = [node for node in state.nodes.values() if node.name != self._node]
        self._admission.set_node_addresses(str(address) for node in others for address in node.addresses)
        self._update_links()

    def want(self, targets: Mapping[Peer, Target]) -> None:
        """The identities to ask each node for (the results' full set)."""
        wants: dict[str, set[SpiffeId]] = {}
        for peer in targets:
            wants.setdefault(peer.node, set()).add(peer.remote_id)
        self._wants = {node: frozenset(ids) for node, ids in wants.items()}
        self._update_links()

    def ask_again(self, peers: Collection[Peer]) -> None:
        """Ask the peers' nodes again for them."""
        for peer in peers:
            link = self._links.get(peer.node)
            if link is not None and link.session is not None:
                link.session.ask_again([peer.remote_id])

    def hurry(self, node: str) -> bool:
        """Dial ``node`` now if this side dials it and no session is up."""
        link = self._links.get(node)
        if link is None or link.session is not None or not link.dialer:
            return False
        link.backoff.reset()
        link.wake.set()
        return True

    def local_changed(self, spiffe_id: SpiffeId) -> None:
        """A local workload's SVID appeared, rotated or went away: push the news to who wants it."""
        for link in self._links.values():
            if link.session is not None:
                link.session.local_changed(spiffe_id)

    def local_synced(self, *, everything: bool = False) -> None:
        """The local SVIDs synced: what was "not hosted yet" gets its final answer (or every answer)."""
        for link in self._links.values():
            if link.session is not None:
                link.session.reanswer(everything=everything)

    def own_rotated(self) -> None:
        """This node's SVID changed: re-establish every channel with it, make-before-break."""
        for link in self._links.values():
            link.backoff.reset()
            session = link.session
            if session is not None and not link.dialer:
                session.request_redial()
                asyncio.get_running_loop().call_later(
                    self._timeout, self._close_unless_replaced, link, session
                )
                continue
            if session is not None:
                self._renew(link)
            else:
                link.wake.set()

    @staticmethod
    def _close_unless_replaced(link: _Link, session: Session) -> None:
        """The dialer did not redial as asked: end the session, so that it dials a new one."""
        if link.session is session:
            session.close()

    def bundles_changed(self, bundles: BundleSet) -> None:
        """New trust bundles: a session whose peer's node SVID no longer verifies ends now (fail closed).

        A session authenticates its peer once, in its handshake; without this, a node whose trust domain
        was removed would keep its channel, and the keys learned on it, for as long as it stays up.
        """
        now = self._now()
        for link in self._links.values():
            session = link.session
            if session is None:
                continue
            try:
                verify_chain(session.ends.peer_chain, bundles, at=now, authorize=authorize_id(link.node_id))
            except SvidError as err:
                self._failed(link.name, f"peer-{err.rule}", err)
                link.session = None
                session.close()

    def tunnel_changed(self) -> None:
        """This node's WireGuard key changed: every session announces it."""
        for link in self._links.values():
            if link.session is not None:
                link.session.tunnel_changed()

    def sessions(self) -> dict[str, bool]:
        """Every peer node this node keeps a channel with, and whether it is up."""
        return {name: link.session is not None for name, link in sorted(self._links.items())}

    # ---------------------------------------------------------------------------------- the links

    def _update_links(self) -> None:
        state, local_id = self._state, self._local_id
        if state is None or local_id is None:
            return
        names = set(policy_peers(state, self._node)) | set(self._wants)
        if self._tunnel is not None:
            names |= set(state.nodes) - {self._node}
        for name in list(self._links):
            node = state.node(name)
            if name not in names or node is None:
                self._drop_link(self._links.pop(name))
        for name in sorted(names):
            node = state.node(name)
            if node is None:
                continue
            addresses = tuple(str(address) for address in node.addresses)
            port = node.attest_port or self._config.port
            link = self._links.get(name)
            if link is None or link.node_id != node.spiffe_id:
                if link is not None:
                    self._drop_link(link)
                link = self._links[name] = _Link(
                    name, node.spiffe_id, addresses, port, self._backoff(), dials(local_id, node.spiffe_id)
                )
            else:
                link.addresses, link.port = addresses, port
            link.wanted = self._wants.get(name, frozenset())
            if link.session is not None:
                link.session.want(link.wanted)
            self._start(link)

    def _start(self, link: _Link) -> None:
        if link.dialer and link.task is None and self._group is not None:
            link.task = self._group.create_task(
                self._dial_loop(link), name=f"channel-{link.name}", context=self._context
            )

    def _drop_link(self, link: _Link) -> None:
        if link.task is not None:
            link.task.cancel()
        if link.session is not None:
            link.session.close()

    # ------------------------------------------------------------------------------------ dialing

    async def run(self) -> None:
        """Keep the channels this node dials up, until cancelled."""
        try:
            async with asyncio.TaskGroup() as group:
                # Dial loops start from whoever changed the wants; they run (and log) as this job.
                self._context = contextvars.copy_context()
                self._group = group
                for link in self._links.values():
                    link.task = None
                    self._start(link)
                await asyncio.Future()
        finally:
            self._group = None

    async def _dial_loop(self, link: _Link) -> None:
        while True:
            link.wake.clear()
            link.renew = False
            up_since: float | None = None
            try:
                session = await self._dial(link)
                up_since = self._clock()
                await self._keep(link, session, up_since)
            except _SESSION_ENDS as err:
                self._failed(link.name, _reason(err), err)
            if up_since is not None:
                link.backoff.reset()
                if self._clock() - up_since >= STEADY_SESSION:
                    continue  # the peer re-established (it restarted, say): proofs wait for no backoff
            delay = link.backoff.next_delay()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(link.wake.wait(), delay)

    async def _dial(self, link: _Link) -> Session:
        reader, writer, address, chain = await self._connect(link)
        return self._session(reader, writer, link, address, chain)

    async def _keep(self, link: _Link, session: Session, up_since: float) -> None:
        """Run the dialed ``session`` until it ends; when asked to renew, dial the next one first.

        A renewal waits until the session has lasted :data:`STEADY_SESSION` (a peer that asks again and
        again gets one new session a period), and after a failed dial, for the backoff, while the
        current session goes on.
        """
        running = asyncio.ensure_future(self._run_session(link, session, "dialed"))
        not_before = up_since + STEADY_SESSION
        try:
            while True:
                wait = max(0.0, not_before - self._clock()) if link.renew else None
                if wait == 0:
                    link.renew = False
                    try:
                        following = await self._dial(link)
                    except _SESSION_ENDS as err:
                        self._failed(link.name, _reason(err), err)  # the current session goes on meanwhile
                        link.renew = True
                        not_before = self._clock() + link.backoff.next_delay()
                        continue
                    link.backoff.reset()
                    previous = running
                    running = asyncio.ensure_future(self._run_session(link, following, "dialed"))
                    session.close()
                    session, not_before = following, self._clock() + STEADY_SESSION
                    with contextlib.suppress(*_SESSION_ENDS):
                        await previous
                    continue
                woken = asyncio.ensure_future(link.wake.wait())
                await asyncio.wait((running, woken), timeout=wait, return_when=asyncio.FIRST_COMPLETED)
                woken.cancel()
                if running.done():
                    return running.result()
                link.wake.clear()
        finally:
            running.cancel()
            with contextlib.suppress(asyncio.CancelledError, *_SESSION_ENDS):
                await running

    async def _connect(
        self, link: _Link
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, str, tuple[x509.Certificate, ...]]:
        own = self._identities.own_svid()
        if own is None:
            raise AttestError("not-ready", "this node holds no SVID yet")
        bundles = self._identities.bundles()
        context = self._contexts.get(own, bundles, server=False)
        errors = []
        for address in link.addresses:
            writer: asyncio.StreamWriter | None = None
            try:
                async with asyncio.timeout(self._connect_timeout):
                    try:
                        reader, writer = await asyncio.open_connection(
                            sock=await _dial(address, link.port, self._local_addresses)
                        )
                    except OSError as err:
                        errors.append(f"{address}: {err}")
                        continue
                    await writer.start_tls(context, ssl_handshake_timeout=self._connect_timeout)
                chain = peer_chain(writer.get_extra_info("ssl_object"))
                try:
                    verify_chain(chain, bundles, at=self._now(), authorize=authorize_id(link.node_id))
                except SvidError as err:
                    raise AttestError(
                        f"server-{err.rule}", f"{address}: not node {link.name}: {err}"
                    ) from err
            except BaseException:
                if writer is not None:
                    writer.transport.abort()
                raise
            return reader, writer, address, chain
        raise AttestError("unreachable", f"no address of node {link.name} answered: {'; '.join(errors)}")

    # ---------------------------------------------------------------------------------- accepting

    async def serve(self, sock: socket.socket) -> None:
        """Accept channels on the bound listening socket ``sock`` until cancelled."""
        loop = asyncio.get_running_loop()
        sock.settimeout(0)
        log.info("channel listener started", address=sock.getsockname())
        async with asyncio.TaskGroup() as connections:
            while True:
                conn, address = await loop.sock_accept(sock)
                self._admit(connections, conn, str(address[0]))
                # An accept that finds a connection waiting does not suspend, and a flood keeps the
                # backlog full: give the loop back after each one, or a single turn drains the backlog
                # while proofs, renewals and timers wait.
                await asyncio.sleep(0)

    def _admit(self, connections: asyncio.TaskGroup, conn: socket.socket, source: str) -> None:
        """Refuse and close ``conn`` at once, or start its handshake."""
        refusal = self._admission.admit(source)
        if refusal is not None:
            conn.close()
            self._refused(refusal, source)
            return
        connections.create_task(self._accept(conn, source))

    async def _accept(self, conn: socket.socket, source: str) -> None:
        loop = asyncio.get_running_loop()
        _keepalive(conn)
        writer: asyncio.StreamWriter | None = None
        try:
            try:
                own = self._identities.own_svid()
                if own is None:
                    raise AttestError("not-ready", "this node holds no SVID yet")
                bundles = self._identities.bundles()
                context = self._contexts.get(own, bundles, server=True)
                reader = asyncio.StreamReader(limit=1 << 20)
                protocol = asyncio.StreamReaderProtocol(reader)
                async with asyncio.timeout(self._timeout):
                    transport, _ = await loop.connect_accepted_socket(
                        lambda: protocol, conn, ssl=context, ssl_handshake_timeout=self._timeout
                    )
                writer = asyncio.StreamWriter(transport, protocol, reader, loop)
                chain = peer_chain(writer.get_extra_info("ssl_object"))
                link = self._client_link(chain, bundles)
            finally:
                self._admission.release(source)
            session = self._session(reader, writer, link, source, chain)
            if link.session is not None:
                link.session.close()  # the peer dialed again: its old session is gone
            await self._run_session(link, session, "accepted")
        except _SESSION_ENDS as err:
            self._refused(_reason(err), source, err)
        finally:
            if writer is not None:
                writer.transport.abort()
            conn.close()

    def _client_link(self, chain: tuple[x509.Certificate, ...], bundles: BundleSet) -> _Link:
        """The link of the node whose SVID the client presented; AttestError if it is no node's."""
        state = self._state
        holder: list[_Link] = []

        def authorize(spiffe_id: SpiffeId) -> None:
            node = state.node_by_id(spiffe_id) if state is not None else None
            if node is None or node.name == self._node:
                raise SvidError("unknown-node", f'"{spiffe_id}" is not the identity of a peer node')
            link = self._links.get(node.name)
            if link is None or link.node_id != spiffe_id:
                link = self._links[node.name] = _Link(
                    node.name,
                    node.spiffe_id,
                    tuple(str(a) for a in node.addresses),
                    node.attest_port or self._config.port,
                    self._backoff(),
                    dialer=False,
                    wanted=self._wants.get(node.name, frozenset()),
                )
            holder.append(link)

        try:
            verify_chain(chain, bundles, at=self._now(), authorize=authorize)
        except SvidError as err:
            raise AttestError(f"client-{err.rule}", str(err)) from err
        return holder[0]

    # ---------------------------------------------------------------------------------- sessions

    def _session(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        link: _Link,
        address: str,
        chain: tuple[x509.Certificate, ...],
    ) -> Session:
        assert self._local_id is not None
        session = Session(
            (reader, writer),
            Ends(self._local_id, link.name, link.node_id, address, chain),
            self._identities,
            self._results,
            self._checker,
            hello_timeout=self._timeout,
            now=self._now,
            stats=self.stats.exchanged,
            tunnel=self._tunnel,
            on_redial=lambda: self._renew(link) if link.dialer else None,
        )
        session.want(link.wanted)
        return session

    @staticmethod
    def _renew(link: _Link) -> None:
        """The peer's SVID rotated: open the next session, then close the current one."""
        link.renew = True
        link.wake.set()

    async def _run_session(self, link: _Link, session: Session, side: str) -> None:
        link.session = session
        self.stats.opened[side] += 1
        log.info("channel up", node=link.name, side=side, address=session.ends.address)
        try:
            await session.run()
        finally:
            if link.session is session:
                link.session = None
            session.close()

    # ---------------------------------------------------------------------------------- reporting

    def _failed(self, node: str, reason: str, err: BaseException) -> None:
        self.stats.ended[reason] += 1
        self._log("channel lost", reason, node=node, error=str(err))

    def _refused(self, reason: str, source: str, err: BaseException | None = None) -> None:
        self.stats.refused[reason] += 1
        self._log("channel refused", reason, source=source, error=str(err) if err else None)

    def _log(self, event: str, reason: str, **fields: object) -> None:
        now = self._clock()
        if now - self._logged_at.get(reason, -LOG_INTERVAL) < LOG_INTERVAL:
            self._unlogged[reason] += 1
            return
        self._logged_at[reason] = now
        log.warning(event, reason=reason, unlogged_since=self._unlogged.pop(reason, 0), **fields)


_TLS_REASONS = {
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": "no-client-certificate",
    "CERTIFICATE_VERIFY_FAILED": "untrusted-certificate",
    "TLSV1_ALERT_UNKNOWN_CA": "untrusted-certificate",
    "WRONG_VERSION_NUMBER": "not-tls",
    "HTTP_REQUEST": "not-tls",
    "UNSUPPORTED_PROTOCOL": "tls-version",
    "TLSV1_ALERT_PROTOCOL_VERSION": "tls-version",
}


def _reason(err: BaseException) -> str:
    """The counted reason of a channel that failed or ended."""
    if isinstance(err, ViolationError | AttestError):
        return err.reason
    if isinstance(err, ssl.SSLError):
        return _TLS_REASONS.get(err.reason or "", "tls-error")
    if isinstance(err, TimeoutError):
        return "deadline"
    if isinstance(err, asyncio.IncompleteReadError | ConnectionError):
        return "closed"
    return "connection-error"


async def _dial(address: str, port: int, sources: tuple[str, ...]) -> socket.socket:
    """A TCP connection to ``address:port`` with keepalive on, from this node's own address if it has one.

    The peer admits node addresses only: the connection leaves from the first of this node's addresses
    in cluster state of the same family, when that address is local; otherwise the kernel chooses.
    """
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setblocking(False)  # noqa: FBT003 - the socket API
    try:
        _keepalive(sock)
        for source in sources:
            if (":" in source) == (family == socket.AF_INET6):
                with contextlib.suppress(OSError):  # not an address of this host (NAT): any source
                    sock.bind((source, 0))
                break
        await asyncio.get_running_loop().sock_connect(sock, (address, port))
    except BaseException:
        sock.close()
        raise
    return sock


def _keepalive(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in zip(
        (socket.TCP_KEEPIDLE, socket.TCP_KEEPINTVL, socket.TCP_KEEPCNT), KEEPALIVE, strict=True
    ):
        sock.setsockopt(socket.IPPROTO_TCP, option, value)


def bind(address: str, port: int) -> socket.socket:
    """Bind and listen on ``address:port`` for the channels (the composition root owns the socket)."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((address, port))
        sock.listen(1024)
    except OSError as err:
        with contextlib.suppress(OSError):
            sock.close()
        # EADDRNOTAVAIL (attest.listen_address is not this host's), EADDRINUSE: one line, not a traceback.
        raise AttestError("listen", f"cannot listen on {address}:{port}: {err.strerror}") from err
    return sock
