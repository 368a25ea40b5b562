"""``authd dev-spire``: a SPIRE server and one agent per node in one process, on SPIRE's own wire APIs.

Layout under ``--dir`` (like a SPIRE deployment's sockets)::

    DIR/<node>/public/api.sock      Workload API of <node>'s agent (world-connectable, like SPIRE's)
    DIR/<node>/private/admin.sock   Delegated Identity API of <node>'s agent (directory mode 0700)
    DIR/server/api.sock             the server's Entry API
    DIR/server/state.json           CA keys and entries (0600), so a restart keeps both

One sync loop drives everything: CA rotation steps, SVID rotations at half-life, and entry changes,
which reach open streams at once (SPIRE's agents poll every 5 s). Nothing here is specific to authd: a
client cannot tell this process from SPIRE by what it sends.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import structlog

from authd.errors import ConfigError
from authd.identity import SpiffeId, TrustDomain
from authd.spire.dev.agent import DevAgent
from authd.spire.dev.bundle_api import BundleService
from authd.spire.dev.ca import CertificateAuthority
from authd.spire.dev.calls import ClosingServer, Servable
from authd.spire.dev.delegated_api import DelegatedIdentityService
from authd.spire.dev.entry_api import EntryService
from authd.spire.dev.registry import EntryRegistry, load_seed
from authd.spire.dev.state import load_state, save_state, state_path
from authd.spire.dev.workload_api import WorkloadApiService

log = structlog.get_logger(__name__)

Clock = Callable[[], dt.datetime]

MAX_SOCKET_PATH = 107  # sun_path is 108 bytes including the terminating NUL


def workload_socket(directory: Path, node: str) -> Path:
    """The Workload API socket of ``node``'s agent."""
    return directory / node / "public" / "api.sock"


def admin_socket(directory: Path, node: str) -> Path:
    """The admin (Delegated Identity API) socket of ``node``'s agent."""
    return directory / node / "private" / "admin.sock"


def server_socket(directory: Path) -> Path:
    """The server's API socket (Entry API)."""
    return directory / "server" / "api.sock"


@dataclass(frozen=True, slots=True)
class DevSpireOptions:
    """What ``authd dev-spire`` was asked to run."""

    directory: Path
    trust_domain: TrustDomain
    nodes: tuple[str, ...]
    entries_file: Path | None = None
    svid_ttl: dt.timedelta = dt.timedelta(hours=1)
    ca_ttl: dt.timedelta = dt.timedelta(hours=24)
    authorized_delegates: tuple[SpiffeId, ...] = ()
    federated_trust_domain: TrustDomain | None = None

    def check(self) -> None:
        """Refuse options SPIRE would refuse, or that cannot work; raise ConfigError listing them all."""
        problems = []
        if not self.nodes or len(set(self.nodes)) != len(self.nodes):
            problems.append("--node: give each node once, at least one")
        if self.svid_ttl <= dt.timedelta(0) or self.ca_ttl <= dt.timedelta(0):
            problems.append("--svid-ttl and --ca-ttl must be positive")
        if self.federated_trust_domain == self.trust_domain:
            problems.append("--federated-trust-domain must differ from --trust-domain")
        sockets = [server_socket(self.directory)]
        for node in self.nodes:
            sockets += [workload_socket(self.directory, node), admin_socket(self.directory, node)]
        problems.extend(
            f"--dir: socket path {str(path)!r} is longer than {MAX_SOCKET_PATH} bytes"
            for path in sockets
            if len(str(path.absolute()).encode()) > MAX_SOCKET_PATH
        )
        if problems:
            raise ConfigError(problems)


@dataclass
class _Listener:
    path: Path
    server: ClosingServer


def _remove_socket(path: Path) -> None:
    path.unlink(missing_ok=True)


def _prepare_socket_directory(path: Path, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.parent.chmod(mode)
    path.unlink(missing_ok=True)  # left behind by a killed predecessor


@dataclass
class DevSpire:
    """The running stand-in; use as ``async with DevSpire(options) as spire: await spire.serve_forever()``."""

    options: DevSpireOptions
    clock: Clock = field(default=lambda: dt.datetime.now(dt.UTC))
    agents: dict[str, DevAgent] = field(init=False, default_factory=dict)
    authorities: dict[TrustDomain, CertificateAuthority] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        """Nothing touches the disk or sockets until :meth:`start`."""
        self.options.check()
        known = [self.options.trust_domain]
        if self.options.federated_trust_domain is not None:
            known.append(self.options.federated_trust_domain)
        self.registry = EntryRegistry(self.options.trust_domain, known, self._entries_changed)
        self._listeners: list[_Listener] = []
        self._wake = asyncio.Event()
        self._state_file = state_path(self.options.directory)

    async def __aenter__(self) -> Self:
        """Start serving."""
        await self.start()
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        """Stop serving and remove the sockets."""
        await self.stop()

    # ------------------------------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Load or create state, seed entries, mint SVIDs, then open every socket."""
        options = self.options
        now = self.clock()
        state = load_state(self._state_file) or {}
        if state and state.get("trust_domain") != options.trust_domain.name:
            raise ConfigError(
                [f"--trust-domain: {options.directory} belongs to trust domain {state.get('trust_domain')!r}"]
            )
        saved: dict[str, Any] = state.get("authorities", {})
        domains = [
            options.trust_domain,
            *([options.federated_trust_domain] if options.federated_trust_domain else []),
        ]
        for td in domains:
            if td.name in saved:
                self.authorities[td] = CertificateAuthority.from_state(td, options.ca_ttl, saved[td.name])
            else:
                self.authorities[td] = CertificateAuthority.create(td, options.ca_ttl, now)
        self.registry.load_state(state.get("entries", []))
        if options.entries_file is not None:
            for entry in load_seed(options.entries_file, options.trust_domain):
                self.registry.create(entry)  # ALREADY_EXISTS after a restart, which is fine
        for node in options.nodes:
            self.agents[node] = DevAgent(
                node,
                options.trust_domain,
                default_ttl=options.svid_ttl,
                authorized_delegates=options.authorized_delegates,
            )
        self._sync()
        self._save()
        for node, agent in self.agents.items():
            await self._listen(
                workload_socket(options.directory, node), [WorkloadApiService(agent)], 0o755, 0o777
            )
            await self._listen(
                admin_socket(options.directory, node), [DelegatedIdentityService(agent)], 0o700, 0o600
            )
        await self._listen(
            server_socket(options.directory),
            [
                EntryService(self.registry),
                BundleService(
                    options.trust_domain, self._federated, self.remove_federated_trust_domain, self.registry
                ),
            ],
            0o700,
            0o600,
        )
        log.info(
            "dev-spire ready",
            trust_domain=options.trust_domain.name,
            federated_trust_domain=options.federated_trust_domain.name
            if options.federated_trust_domain
            else None,
            workload_sockets={node: str(workload_socket(options.directory, node)) for node in options.nodes},
            admin_sockets={node: str(admin_socket(options.directory, node)) for node in options.nodes},
            server_socket=str(server_socket(options.directory)),
            entries=len(self.registry),
        )

    async def _listen(
        self, path: Path, services: list[Servable], directory_mode: int, socket_mode: int
    ) -> None:
        _prepare_socket_directory(path, directory_mode)
        server = ClosingServer(services)
        await server.start(path=str(path), backlog=1024)
        os.chmod(path, socket_mode)  # noqa: PTH101 - a metadata change on a local socket, never blocks
        self._listeners.append(_Listener(path, server))

    async def stop(self) -> None:
        """Close every socket (ending open streams) and save state."""
        for listener in self._listeners:
            listener.server.close()
        for listener in self._listeners:
            with contextlib.suppress(asyncio.CancelledError):
                await listener.server.wait_closed()
        for listener in self._listeners:
            _remove_socket(listener.path)
        self._listeners.clear()
        if self.authorities:
            self._save()
        log.info("dev-spire stopped")

    async def serve_forever(self) -> None:
        """Run the sync loop until cancelled."""
        while True:
            self._wake.clear()
            deadline = self._sync()
            delay = max((deadline - self.clock()).total_seconds(), 0.0)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._wake.wait()

    # ------------------------------------------------------------------------------------------ sync

    def _sync(self) -> dt.datetime:
        """Apply rotations and entry changes due now; return when the next one is due."""
        now = self.clock()
        rotated = [td for td, ca in self.authorities.items() if ca.advance(now)]
        if rotated:
            for td in rotated:
                bundle = self.authorities[td].bundle()
                log.info("CA rotation step", trust_domain=td.name, authorities=len(bundle.authorities))
            self._save()
        bundles = {td: ca.bundle() for td, ca in self.authorities.items()}
        local = self.authorities[self.options.trust_domain]
        for agent in self.agents.values():
            agent.sync(self.registry.for_parent(agent.id), local, bundles, now)
        deadlines = [ca.next_change() for ca in self.authorities.values()]
        deadlines += [at for agent in self.agents.values() if (at := agent.next_rotation()) is not None]
        return min(deadlines)

    def remove_federated_trust_domain(self, trust_domain: TrustDomain) -> None:
        """Stop federating with ``trust_domain`` (``spire-server bundle delete``): agents drop its bundle."""
        if trust_domain == self.options.trust_domain or trust_domain not in self.authorities:
            raise ValueError(f"dev-spire: {trust_domain} is not a federated trust domain")
        del self.authorities[trust_domain]
        self._save()
        self._sync()

    def _federated(self) -> set[TrustDomain]:
        return set(self.authorities) - {self.options.trust_domain}

    def _entries_changed(self) -> None:
        if self.authorities:  # not while loading
            self._save()
            self._wake.set()

    def _save(self) -> None:
        save_state(
            self._state_file,
            {
                "trust_domain": self.options.trust_domain.name,
                "authorities": {td.name: ca.to_state() for td, ca in self.authorities.items()},
                "entries": self.registry.to_state(),
            },
        )


async def run_until_signalled(options: DevSpireOptions) -> None:
    """Serve until SIGTERM or SIGINT, then shut down cleanly (sockets removed, state saved)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        async with DevSpire(options) as spire:
            serving = asyncio.create_task(spire.serve_forever(), name="dev-spire-sync")
            stopping = asyncio.create_task(stop.wait(), name="dev-spire-stop")
            done, _ = await asyncio.wait({serving, stopping}, return_when=asyncio.FIRST_COMPLETED)
            stopping.cancel()
            if serving in done:
                serving.result()  # the sync loop never returns: this re-raises its failure
            log.info("dev-spire stopping")
            serving.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await serving
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
