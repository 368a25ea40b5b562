"""The encryption job: this node's WireGuard interface, kept in line with cluster state and the channels.

At start the job opens the backend (``[encryption] backend``), adopting the interface an earlier authd
left (same key, same sessions: a restart loses nothing), and gives it the node key from the key file.
Then it keeps one peer per remote node in cluster state whose keys arrived over that node's channel
(:class:`~authd.attest.channel.TunnelKeys`): AllowedIPs the node's workload prefixes, endpoint its first
address and announced port (:func:`~authd.encryption.peers.desired_peers`), and routes every remote
workload prefix through the interface.

Keys learned over a channel are bound to the node SVID that session verified. They are dropped, and the
peer removed at the next reconcile (at once), when the node leaves cluster state or changes its SPIFFE
ID, when that SVID expires without a newer session, or when a bundle change makes it unverifiable. A
public key claimed by two nodes, or equal to this node's own, gives no peer to either (a node that
announced another's key would otherwise move that key's AllowedIPs).

A peer whose key the device has not met yet (a node's first key, or its rotated one) is greeted: it gets
a persistent keepalive, which makes the device handshake with it at once, until the device reports a
handshake with that key (or :data:`GREETING` seconds passed). So when a node rotates its key, its peers
meet the new key as soon as they learn it, instead of when the rotating node's next handshake attempt
comes, five seconds (WireGuard's REKEY_TIMEOUT) after its first one went to a peer that did not know the
key yet; until then WireGuard holds the packets for the peer, up to its queue's size. A greeting that
has no handshake after :data:`GREETING_RETRY` seconds sets the peer afresh (removed, then added again):
the rotating node may not have applied the new preshared key yet when the first handshake came, and
WireGuard would not try again for five seconds.

Peers found on an adopted interface are kept for :data:`ADOPT_GRACE` seconds, while the channels come
back, when their endpoint is a node's address in cluster state and their AllowedIPs lie within that
node's prefixes; any other peer is removed at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

import structlog
from cryptography import x509

from authd.attest.channel import Ends, TunnelKey
from authd.cluster.model import ClusterState
from authd.config.model import EncryptionConfig
from authd.config.schema import IpNetwork
from authd.encryption import keys
from authd.encryption.backend import WireGuardBackend, open_backend
from authd.encryption.device import DeviceStatus, PeerSpec, PeerStatus
from authd.encryption.keys import KeyPair, PublicKey
from authd.encryption.peers import PeerKeys, desired_peers, tunnel_routes, workload_prefixes
from authd.encryption.rotation import Rotation, SwapRotation
from authd.encryption.routes import sync_routes
from authd.errors import EncryptionError, SvidError
from authd.health import Component
from authd.identity import SpiffeId
from authd.x509svid import BundleSet, authorize_id, verify_chain

log = structlog.get_logger(__name__)

ADOPT_GRACE = 30.0
"""Seconds an adopted interface's peers are kept for their channel to come back."""
STATUS_INTERVAL = 2.0
"""Seconds between two reads of the device's status (handshakes, bytes) for status and metrics."""
GREETING = 10.0
"""Seconds at most that a peer with a key new to the device keeps its keepalive, waiting for a handshake."""
GREETING_POLL = 0.05
"""Seconds between two reads of the device's status while a peer is greeted."""
GREETING_RETRY = 0.25
"""Seconds a greeted peer waits for its handshake before it is set afresh, for a new first handshake."""
ROTATION_RESULTS = ("ok", "failed")
REFUSALS = ("duplicate-key", "own-key", "expired", "untrusted")
OpenBackend = Callable[[EncryptionConfig, Path], WireGuardBackend]
SyncRoutes = Callable[[int, frozenset[IpNetwork]], None]


class Announcer(Protocol):
    """Who tells the peers this node's key (the channels)."""

    def tunnel_changed(self) -> None:
        """This node's key has a new generation: send it on every channel."""
        ...


@dataclass(frozen=True, slots=True)
class _Learned:
    keys: PeerKeys
    node_id: SpiffeId
    chain: tuple[x509.Certificate, ...]
    valid_until: float
    learned_at: float
    key_since: float


@dataclass(slots=True)
class _Greeting:
    """A peer with a key new to the device, greeted with a keepalive until ``until`` (Unix time)."""

    until: float
    set_at: float
    """When the peer was last set on the device (for a new first handshake)."""


@dataclass
class TunnelStats:
    """What the job did: rotations by result, announced keys refused by reason."""

    rotations: Counter[str] = field(default_factory=Counter)
    refused: Counter[str] = field(default_factory=Counter)


def _open(config: EncryptionConfig, runtime_dir: Path) -> WireGuardBackend:
    return open_backend(
        config.backend, config.interface, wireguard_go=config.wireguard_go, runtime_dir=runtime_dir
    )


class Tunnel:
    """The node's WireGuard interface, run as the ``encryption`` job."""

    def __init__(  # noqa: PLR0913 - the job's inputs, each named (all but three keyword-only)
        self,
        config: EncryptionConfig,
        node: str,
        component: Component,
        *,
        state_dir: Path,
        runtime_dir: Path,
        set_tunnel: Callable[[int], None],
        opener: OpenBackend = _open,
        routes: SyncRoutes = sync_routes,
        rotation: Rotation | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """Nothing touches the kernel before :meth:`run`."""
        self._config, self._node, self._component = config, node, component
        self._state_dir, self._runtime_dir = state_dir, runtime_dir
        self._set_tunnel, self._opener, self._sync_routes, self._clock = set_tunnel, opener, routes, clock
        self._rotation = rotation or SwapRotation()
        self._announcer: Announcer | None = None
        self._state: ClusterState | None = None
        self._learned: dict[str, _Learned] = {}
        self._inherited: dict[PublicKey, float] = {}
        self._applied: dict[str, PeerSpec] = {}
        self._greeting: dict[str, _Greeting] = {}
        self._present: set[PublicKey] = set()
        self._routes: frozenset[IpNetwork] | None = None
        self._backend: WireGuardBackend | None = None
        self._pair: KeyPair | None = None
        self._key_since = 0.0
        self._generation = 0
        self._device: DeviceStatus | None = None
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self.stats = TunnelStats(
            Counter(dict.fromkeys(ROTATION_RESULTS, 0)), Counter(dict.fromkeys(REFUSALS, 0))
        )

    def announce_through(self, announcer: Announcer) -> None:
        """Announce key changes through ``announcer`` (the channels, built after this job)."""
        self._announcer = announcer

    # ------------------------------------------------------------------------- the channels' side

    def local_key(self) -> TunnelKey | None:
        """This node's key, once the interface is up."""
        if self._pair is None or self._backend is None:
            return None
        return TunnelKey(self._pair.public, self._config.listen_port, self._generation)

    def learned(self, ends: Ends, keys: PeerKeys) -> None:
        """A channel session with ``ends.peer_name`` announced ``keys``."""
        now = self._clock()
        if self._pair is not None and keys.public_key == self._pair.public:
            self._refuse("own-key", ends.peer_name)
            return
        leaf = ends.peer_chain[0].not_valid_after_utc.timestamp() if ends.peer_chain else now
        previous = self._learned.get(ends.peer_name)
        same = previous is not None and previous.keys.public_key == keys.public_key
        since = previous.key_since if same and previous is not None else now
        self._learned[ends.peer_name] = _Learned(keys, ends.peer_id, ends.peer_chain, leaf, now, since)
        if any(
            n != ends.peer_name and k.keys.public_key == keys.public_key for n, k in self._learned.items()
        ):
            self._refuse("duplicate-key", ends.peer_name)
        self._wake.set()

    def _refuse(self, reason: str, node: str) -> None:
        self.stats.refused[reason] += 1
        log.warning("wireguard key refused", reason=reason, node=node)

    # ---------------------------------------------------------------------------------- inputs

    def cluster_changed(self, state: ClusterState) -> None:
        """A new cluster state: peers, AllowedIPs and routes follow at once."""
        self._state = state
        self._wake.set()

    def bundles_changed(self, bundles: BundleSet) -> None:
        """Drop the keys of every node whose SVID the new bundles no longer verify."""
        at = datetime.fromtimestamp(self._clock(), UTC)
        for name, learned in list(self._learned.items()):
            try:
                verify_chain(learned.chain, bundles, at=at, authorize=authorize_id(learned.node_id))
            except SvidError as err:
                del self._learned[name]
                self.stats.refused["untrusted"] += 1
                log.warning("wireguard peer dropped", reason="untrusted", node=name, error=str(err))
        self._wake.set()

    # ---------------------------------------------------------------------------------- rotation

    async def rotate(self) -> TunnelKey:
        """Rotate the node key now (``authd encryption rotate``); the key then in force."""
        try:
            await self._rotation.rotate(self)
        except EncryptionError:
            self.stats.rotations["failed"] += 1
            raise
        self.stats.rotations["ok"] += 1
        local = self.local_key()
        assert local is not None
        log.info("wireguard key rotated", public_key=str(local.public_key), generation=local.generation)
        return local

    async def install_key(self, pair: KeyPair) -> None:
        """Store ``pair`` and make it the interface's private key (for the rotation)."""
        backend = self._backend
        if backend is None:
            raise EncryptionError("encryption: the WireGuard interface is not up")
        async with self._lock:
            await asyncio.to_thread(keys.store, self._state_dir, pair)
            await asyncio.to_thread(backend.configure, private_key=pair)
            self._pair, self._key_since = pair, self._clock()

    def announce(self) -> None:
        """A new generation of this node's key, sent on every channel with fresh PSK shares."""
        self._generation += 1
        if self._announcer is not None:
            self._announcer.tunnel_changed()

    # ------------------------------------------------------------------------------------ the job

    async def run(self) -> None:
        """Open the interface, then reconcile until cancelled; the interface is left up on the way out."""
        backend = await asyncio.to_thread(self._start)
        try:
            self._set_tunnel(backend.ifindex)
            self._backend = backend
            self._component.ready(f"{backend.name} backend on {backend.interface}")
            self.announce()
            while True:
                await self._reconcile(backend)
                if self._rotation_due():
                    with contextlib.suppress(EncryptionError):  # counted as failed; retried next interval
                        await self.rotate()
                with contextlib.suppress(TimeoutError):  # not wait_for: on 3.11 it can swallow a cancel
                    async with asyncio.timeout(self._next_wake()):
                        await self._wake.wait()
                self._wake.clear()
        finally:
            self._backend = None
            backend.close(remove=False)
            if not _exists(backend.interface):
                self._set_tunnel(0)

    def _start(self) -> WireGuardBackend:
        pair = keys.load_or_create(self._state_dir)
        self._key_since = (self._state_dir / keys.KEY_FILE).stat().st_mtime
        backend = self._opener(self._config, self._runtime_dir)
        try:
            device = backend.status()
            if device.public_key != pair.public or device.listen_port != self._config.listen_port:
                backend.configure(private_key=pair, listen_port=self._config.listen_port)
            else:
                log.info("wireguard interface adopted", interface=backend.interface, peers=len(device.peers))
            deadline = self._clock() + ADOPT_GRACE
            self._inherited = {peer.public_key: deadline for peer in device.peers}
            self._present = set(self._inherited)
            self._device = device
        except BaseException:
            backend.close(remove=False)
            raise
        self._pair = pair
        return backend

    def _rotation_due(self) -> bool:
        interval = self._config.rotation_interval.total_seconds()
        return interval > 0 and self._clock() >= self._key_since + interval

    def _next_wake(self) -> float:
        now = self._clock()
        moments = [learned.valid_until for learned in self._learned.values()]
        moments += list(self._inherited.values())
        interval = self._config.rotation_interval.total_seconds()
        if interval > 0:
            moments.append(self._key_since + interval)
        if self._greeting:
            moments.append(now + GREETING_POLL)
        return max(min([now + STATUS_INTERVAL, *moments]) - now, 0.01)

    def _usable(self, state: ClusterState, now: float) -> dict[str, PeerKeys]:
        """Learned keys still bound to a live node SVID of a node in ``state``; duplicates excluded."""
        for name, learned in list(self._learned.items()):
            node = state.node(name)
            if node is None or node.spiffe_id != learned.node_id or learned.valid_until <= now:
                del self._learned[name]
                if node is not None and learned.valid_until <= now:
                    self.stats.refused["expired"] += 1
                log.info("wireguard peer keys dropped", node=name)
        claims = Counter(learned.keys.public_key for learned in self._learned.values())
        return {name: k.keys for name, k in self._learned.items() if claims[k.keys.public_key] == 1}

    def _kept_inherited(self, state: ClusterState, peers: dict[str, PeerSpec], now: float) -> set[PublicKey]:
        """Adopted peers still waiting for their channel, within their node's prefixes."""
        device = self._device
        kept: set[PublicKey] = set()
        for key, deadline in list(self._inherited.items()):
            status = device.peer(key) if device is not None else None
            owner = _owner(state, status) if status is not None and deadline > now else None
            if (
                status is None
                or owner is None
                or owner == self._node
                or owner in peers
                or not set(status.allowed_ips) <= set(workload_prefixes(state, owner))
            ):
                del self._inherited[key]
                continue
            kept.add(key)
        return kept

    def _greeted(self, peers: dict[str, PeerSpec], now: float) -> tuple[dict[str, PeerSpec], set[PublicKey]]:
        """``peers`` with greetings, and the keys of the peers to set afresh.

        A peer whose key the device has not handshaken with yet gets a keepalive; after GREETING_RETRY
        without a handshake, it is set afresh.
        """
        device = self._device
        result: dict[str, PeerSpec] = {}
        afresh: set[PublicKey] = set()
        for name, spec in peers.items():
            applied = self._applied.get(name)
            if applied is None or applied.public_key != spec.public_key:
                self._greeting[name] = _Greeting(now + GREETING, now)  # a new key: greeted afresh
            greeting = self._greeting.get(name)
            status = device.peer(spec.public_key) if device is not None else None
            if greeting is None or greeting.until <= now or (status is not None and status.last_handshake):
                self._greeting.pop(name, None)
                result[name] = spec
                continue
            result[name] = replace(spec, keepalive=1)
            if now - greeting.set_at >= GREETING_RETRY:
                afresh.add(spec.public_key)
                greeting.set_at = now
        for name in set(self._greeting) - set(peers):
            del self._greeting[name]
        return result, afresh

    async def _reconcile(self, backend: WireGuardBackend) -> None:
        state = self._state
        if state is None:
            return
        now = self._clock()
        port = self._config.listen_port
        peers, afresh = self._greeted(desired_peers(state, self._node, self._usable(state, now), port), now)
        wanted = {spec.public_key for spec in peers.values()} | self._kept_inherited(state, peers, now)
        changed = [
            spec
            for name, spec in peers.items()
            if self._applied.get(name) != spec or spec.public_key in afresh
        ]
        remove = self._present - wanted
        routes = tunnel_routes(state, self._node)
        async with self._lock:
            if changed or remove:
                if afresh:  # removed first: a peer added again may handshake at once
                    await asyncio.to_thread(backend.configure, remove=afresh & self._present)
                await asyncio.to_thread(backend.configure, peers=changed, remove=remove)
                self._present = (self._present - remove) | {spec.public_key for spec in changed}
                log.info(
                    "wireguard peers updated", peers=len(peers), changed=len(changed), removed=len(remove)
                )
            self._applied = peers
            if routes != self._routes:
                await asyncio.to_thread(self._sync_routes, backend.ifindex, routes)
                self._routes = routes
            self._device = await asyncio.to_thread(backend.status)
        self._component.ready(
            f"{backend.name} backend on {backend.interface}, {len(peers)} of {len(state.nodes) - 1} peers"
        )

    # ---------------------------------------------------------------------------------- reports

    def snapshot(self) -> TunnelSnapshot:
        """The interface, the node key and every peer, as the device last reported them."""
        device, pair, state = self._device, self._pair, self._state
        peers = []
        for name, spec in sorted(self._applied.items()):
            learned = self._learned.get(name)
            peers.append(
                PeerSnapshot(
                    name,
                    spec,
                    learned.key_since if learned is not None else None,
                    learned.learned_at if learned is not None else None,
                    device.peer(spec.public_key) if device is not None else None,
                )
            )
        remote = sorted(name for name in (state.nodes if state is not None else ()) if name != self._node)
        return TunnelSnapshot(
            backend=self._backend.name if self._backend is not None else None,
            interface=self._config.interface,
            listen_port=self._config.listen_port,
            public_key=pair.public if pair is not None else None,
            key_since=self._key_since,
            generation=self._generation,
            peers=tuple(peers),
            without_peer=tuple(name for name in remote if name not in self._applied),
            stats=self.stats,
            at=self._clock(),
        )


@dataclass(frozen=True, slots=True)
class PeerSnapshot:
    """One peer: its node, what authd configured, when its key and PSK arrived, what the device says."""

    node: str
    spec: PeerSpec
    key_since: float | None
    """Unix time the node's current public key was first learned (None: an adopted peer, not yet)."""
    psk_since: float | None
    """Unix time the current preshared key was derived."""
    device: PeerStatus | None


@dataclass(frozen=True, slots=True)
class TunnelSnapshot:
    """The encryption job's state at one moment (``at``, Unix time), for status and metrics."""

    backend: str | None
    """kernel or userspace; None until the interface is up."""
    interface: str
    listen_port: int
    public_key: PublicKey | None
    key_since: float
    generation: int
    peers: tuple[PeerSnapshot, ...]
    without_peer: tuple[str, ...]
    """Remote nodes in cluster state that have no peer (no keys from their channel yet)."""
    stats: TunnelStats
    at: float


def _owner(state: ClusterState, status: PeerStatus) -> str | None:
    """The node in ``state`` whose first address is ``status``'s endpoint."""
    if status.endpoint is None:
        return None
    host = status.endpoint.rsplit(":", 1)[0].strip("[]")
    return next(
        (name for name, node in state.nodes.items() if node.addresses and str(node.addresses[0]) == host),
        None,
    )


def _exists(interface: str) -> bool:
    try:
        socket.if_nametoindex(interface)
    except OSError:
        return False
    return True
