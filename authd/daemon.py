"""The composition root: builds authd's components in order and runs them as named jobs.

Lifecycle: build (nothing touches the kernel or network before the config is valid) -> run jobs in one
``asyncio.TaskGroup`` -> READY=1 once every gating component is ready -> on SIGTERM/SIGINT, STOPPING=1 and
cancel the jobs, waiting at most ``daemon.shutdown_timeout`` -> exit status. SIGHUP re-reads the config:
a config that does not validate is logged and the running one stays; live-changeable keys apply at once,
the others are reported as needing a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator, Callable, Collection, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from authd import log as logsetup
from authd.attest.channels import Channels
from authd.attest.channels import bind as bind_listener
from authd.attest.results import Attestations, Peer
from authd.authmanager import AuthManager
from authd.backoff import BackoffPolicy
from authd.cluster.guard import serve_accept
from authd.cluster.handles import STATE_FILE, HandleRegistry
from authd.cluster.source import local_node_name
from authd.cluster.sources import open_source
from authd.config import Config, load_config
from authd.control import ControlServer, socket_path
from authd.daemonview import DaemonView
from authd.datapath.events import AuthRequiredEvent
from authd.datapath.tables import PinnedAuthTable, PinnedTables
from authd.encryption.tunnel import Tunnel
from authd.errors import ConfigError, ControlError, DaemonError, EncryptionError, SpireError
from authd.flows import FlowLog
from authd.health import Health
from authd.hubble.history import HISTORY_DIR, FlowHistory
from authd.jobs import Job, Supervisor
from authd.ktls.support import KtlsGate, probe
from authd.logbook import Logbook
from authd.sdnotify import Notifier
from authd.spire.agent import IdentityPlane
from authd.spire.entries import EntryClient
from authd.spire.sync import sync as sync_entries
from authd.spire.workload import NodeIdentity
from authd.statelock import StateLock
from authd.status import StatusOp
from authd.svids import EventKind, SvidEvent, SvidStore
from authd.unraisable import UnraisableLog, captured

if TYPE_CHECKING:
    from authd.datapath.enforcement import Enforcement

log = structlog.get_logger(__name__)

ReloadHook = Callable[[Config, Config], None]

EXIT_OK = 0
EXIT_FAILURE = 1


class Daemon:
    """One authd node daemon."""

    def __init__(
        self,
        config: Config,
        config_path: Path,
        *,
        notifier: Notifier | None = None,
        logbook: Logbook | None = None,
    ) -> None:
        """Wire the components from a validated config; nothing runs until :meth:`run`.

        ``logbook``: the one installed in logging (by the CLI), whose recent warnings ``authd status`` shows.
        """
        # First, before anything of another daemon on this state directory could be touched.
        self._state_lock = StateLock(config.node.state_dir)
        self.config = config
        self.logbook = logbook or Logbook()
        self._config_path = config_path
        self._notifier = notifier or Notifier()
        self.health = Health()
        daemon_cfg = config.daemon
        # One policy for every job-level retry: restarts of failed jobs, and the datapath's netlink retries.
        self._restart_backoff = BackoffPolicy(
            initial=daemon_cfg.restart_backoff_initial.total_seconds(),
            maximum=daemon_cfg.restart_backoff_max.total_seconds(),
        )
        self._supervisor = Supervisor(self.health, self._restart_backoff)
        self._jobs: list[Job] = []
        self._reload_hooks: list[ReloadHook] = [self._apply_logging]
        self._stop = asyncio.Event()
        control_health = self.health.register("control")
        self.control = ControlServer(
            socket_path(config.node.runtime_dir), on_listening=lambda: control_health.ready("listening")
        )
        self._jobs.append(Job("control", self.control.run, critical=False))
        self.node_name = local_node_name(config.node.name)
        self.handles = HandleRegistry.open(config.node.state_dir / STATE_FILE, self.node_name)
        self.manager: AuthManager | None = None
        self.enforcement: Enforcement | None = None
        self.flow_log: FlowLog | None = None
        self.flow_history: FlowHistory | None = None
        self.tunnel: Tunnel | None = None
        self._build_datapath()
        # Identity plane: own SVID, local workload SVIDs and bundles; None without SPIRE.
        self.identity_plane = IdentityPlane.from_config(
            config.spire,
            lambda: self.health.register("svids"),
            node=NodeIdentity(self.node_name, config.node.spiffe_id),
        )
        if config.encryption.mode == "wireguard" and self.identity_plane is None:
            needs = 'encryption.mode: "wireguard" needs SPIRE (spire.workload_socket) for the channels'
            raise ConfigError([needs])
        _check_encryption(config)
        if self.identity_plane is not None:
            self._jobs.extend(self.identity_plane.jobs())
            self._build_attestation(self.identity_plane.store)
        self._build_operator_surfaces()

    def _build_operator_surfaces(self) -> None:
        """The ``status`` op on the control socket and, with ``[http]`` on, /metrics, /healthz, /readyz."""
        plane = self.identity_plane
        enforcement = self.enforcement
        attestation = plane is not None
        self.view = DaemonView(
            node=self.node_name,
            health=self.health,
            svids=plane.store if plane is not None else None,
            streams=plane.board if plane is not None else None,
            channels=self.channels if attestation else None,
            attestations=self.attestations if attestation else None,
            cluster=self.cluster if attestation else None,
            ktls=self.ktls if attestation else None,
            tunnel=self.tunnel,
            auth=lambda: self.manager.stats if self.manager is not None else None,
            fail_closed_at=lambda: self.manager.fail_closed_at() if self.manager is not None else None,
            datapath=enforcement.snapshot if enforcement is not None else lambda: None,
            datapath_enabled=enforcement is not None,
            restarts=self._supervisor.restarts,
            recent=self.logbook.entries,
        )
        http = self.config.http
        runtime = {
            "config": str(self._config_path),
            "control_socket": str(self.control.path),
            "state_dir": str(self.config.node.state_dir),
            "metrics": f"http://{http.listen_address}:{http.port}/metrics" if http.enabled else "disabled",
        }
        if enforcement is not None:
            runtime["pin_dir"] = str(self.config.datapath.pin_dir)
        hubble = self.config.hubble
        if hubble.enabled:
            from authd.hubble.server import ObserverServer  # noqa: PLC0415 - its gRPC server only when on

            hubble_health = self.health.register("hubble", gates_ready=False)
            self.observer = ObserverServer(
                self.flow_log,
                self.config.node.runtime_dir / hubble.socket_name,
                tcp_port=hubble.tcp_port,
                on_listening=lambda where: hubble_health.ready(f"serving on {where}"),
            )
            self._jobs.append(Job("hubble", self.observer.run, critical=False))
            runtime["hubble_socket"] = str(self.observer.path)
        self.control.register("status", StatusOp(self.view, runtime=runtime))
        self.control.register("reload", self._serve_reload)
        self.control.register("encryption-rotate", self._serve_rotate)
        if http.enabled:
            from authd.httpapi import HttpServer  # noqa: PLC0415 - aiohttp and prometheus_client only when on

            http_health = self.health.register("http", gates_ready=False)
            self.http = HttpServer(
                http, self.view, on_listening=lambda where: http_health.ready(f"serving on {where}")
            )
            self._jobs.append(Job("http", self.http.run, critical=False))

    def _build_datapath(self) -> None:
        if not self.config.datapath.enabled:
            return
        from authd.datapath.enforcement import Enforcement  # noqa: PLC0415 - loads libbpf only when enabled

        history_bytes = self.config.hubble.history_bytes
        self.flow_history = (
            FlowHistory(self.config.node.state_dir / HISTORY_DIR, history_bytes) if history_bytes else None
        )
        self.flow_log = FlowLog(self.handles, history=self.flow_history)
        enforcement = Enforcement(
            self.config.datapath,
            self.health.register("datapath"),
            on_auth_required=self._auth_required,
            on_flow=self.flow_log.add,
            backoff=self._restart_backoff,
        )
        self.enforcement = enforcement
        self._jobs.extend(enforcement.jobs())
        self._reload_hooks.append(lambda _old, new: enforcement.reload(new.datapath))

    def _build_attestation(self, store: SvidStore) -> None:
        """Cluster state, the node channels and their results and, with a datapath, the auth manager."""
        config = self.config
        self.cluster = open_source(config.cluster, self.node_name, self.health.register("cluster"))
        self._jobs.append(Job(f"cluster-{config.cluster.source}", self.cluster.run, critical=False))
        # Fails closed on its own (the datapath drops kTLS pairs); the gate says why, so it never gates READY.
        self.ktls = KtlsGate(self.node_name, self.health.register("ktls", gates_ready=False), probe())
        self._jobs.append(Job("ktls", lambda: self.ktls.follow(self.cluster.snapshots()), critical=False))
        self.control.register("cluster-accept", lambda request: serve_accept(self.cluster, request))
        self.attestations = Attestations(on_change=self._attestations_changed)
        self.tunnel = self._build_tunnel()
        self.channels = Channels(
            self.node_name,
            store,
            self.attestations,
            config.attest,
            BackoffPolicy(
                initial=config.attest.retry_initial.total_seconds(),
                maximum=config.attest.retry_max.total_seconds(),
            ),
            tunnel=self.tunnel,
        )
        self.attestations.ask_through(self.channels)
        if self.tunnel is not None:
            self.tunnel.announce_through(self.channels)
        self._jobs.append(Job("channel-listener", self._serve_channels, critical=False))
        self._jobs.append(Job("channels", self.channels.run, critical=False))
        self._jobs.append(Job("channel-inputs", self._feed_channels, critical=False))
        self._jobs.append(Job("cluster-workloads", self._follow_local_workloads, critical=False))
        if self.config.datapath.enabled:
            self._jobs.append(Job("auth-manager", self._run_auth_manager, critical=False))
        if config.spire.sync_interval.total_seconds() > 0:
            self._jobs.append(Job("spire-sync", self._sync_spire_entries, critical=False))

    def _build_tunnel(self) -> Tunnel | None:
        """With ``[encryption] mode = "wireguard"``, the encryption job (its ready state gates READY)."""
        encryption = self.config.encryption
        enforcement = self.enforcement
        if encryption.mode != "wireguard":
            if enforcement is not None:  # a pinned config map may name the tunnel of an earlier run
                enforcement.set_tunnel(0)
            return None
        tunnel = Tunnel(
            encryption,
            self.node_name,
            self.health.register("encryption"),
            state_dir=self.config.node.state_dir,
            runtime_dir=self.config.node.runtime_dir,
            set_tunnel=enforcement.set_tunnel if enforcement is not None else _no_datapath,
        )
        self._jobs.append(Job("encryption", tunnel.run, critical=False))
        return tunnel

    async def _serve_rotate(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """The ``encryption-rotate`` op (``authd encryption rotate``): rotate now, answer with the new key."""
        del request
        if self.tunnel is None:
            raise ControlError('rotate: encryption is off ([encryption] mode = "off")')
        try:
            key = await self.tunnel.rotate()
        except EncryptionError as err:
            raise ControlError(f"rotate: {err}") from err
        yield {"rotated": True, "public_key": str(key.public_key), "generation": key.generation}

    async def _sync_spire_entries(self) -> None:
        """Register cluster state's endpoints with the SPIRE server, again every ``spire.sync_interval``."""
        interval = self.config.spire.sync_interval.total_seconds()
        async with EntryClient(self.config.spire.server_socket) as client:
            while True:
                state = self.cluster.current()
                if state is not None:
                    try:
                        await sync_entries(client, state)
                    except SpireError as err:
                        log.warning("spire sync failed, retrying later", error=str(err), retry_in_s=interval)
                await asyncio.sleep(interval)

    async def _serve_channels(self) -> None:
        """Accept channels on ``attest.listen_address``, or this node's first address in cluster state."""
        attest = self.config.attest
        address = attest.listen_address
        if not address:
            async for state in self.cluster.snapshots():
                node = state.node(self.node_name)
                if node is not None and node.addresses:
                    address = str(node.addresses[0])
                    break
        sock = await asyncio.to_thread(bind_listener, address, attest.port)
        try:
            await self.channels.serve(sock)
        finally:
            sock.close()

    async def _feed_channels(self) -> None:
        """Cluster state and SVID changes to the channels (and bundle changes to the results)."""
        assert self.identity_plane is not None
        store = self.identity_plane.store
        async with asyncio.TaskGroup() as group:
            group.create_task(self._feed_channels_cluster())
            with store.subscribe() as events:
                async for event in events:
                    self._svid_event_to_channels(event, store)

    async def _feed_channels_cluster(self) -> None:
        async for state in self.cluster.snapshots():
            self.channels.cluster_changed(state)
            if self.tunnel is not None:
                self.tunnel.cluster_changed(state)

    def _svid_event_to_channels(self, event: SvidEvent, store: SvidStore) -> None:
        kind = event.kind
        if kind in (EventKind.BUNDLE_CHANGED, EventKind.RESYNC):
            self.attestations.bundles_changed(store.bundles())
            self.channels.bundles_changed(store.bundles())
            if self.tunnel is not None:
                self.tunnel.bundles_changed(store.bundles())
        if event.own and kind in (EventKind.ADDED, EventKind.ROTATED):
            self.channels.own_rotated()
        elif event.spiffe_id is not None and not event.own:
            self.channels.local_changed(event.spiffe_id)
        if kind in (EventKind.SYNCED, EventKind.RESYNC):
            self.channels.local_synced(everything=kind is EventKind.RESYNC)

    async def _follow_local_workloads(self) -> None:
        """Tell the identity plane which workloads run here, so it fetches exactly their SVIDs."""
        assert self.identity_plane is not None
        async for state in self.cluster.snapshots():
            local = {
                endpoint.spiffe_id: endpoint.selectors for endpoint in state.endpoints_on(self.node_name)
            }
            self.identity_plane.set_workloads(local)

    async def _run_auth_manager(self) -> None:
        """Once the datapath is loaded, keep its maps in line with cluster state, SVIDs and attestations."""
        assert self.identity_plane is not None
        store = self.identity_plane.store
        assert self.enforcement is not None  # the job exists only with a datapath
        datapath = await self.enforcement.wait_loaded()
        with datapath.maps() as maps:
            if self.handles.fresh:
                flushed = maps.auth.flush()
                log.warning("no identity handle state: auth map flushed", entries=flushed)
                self.handles.fresh = False
            manager = AuthManager(
                node_name=self.node_name,
                handles=self.handles,
                table=PinnedAuthTable(maps.auth, self.handles),
                tables=PinnedTables(maps.ipcache, maps.policy),
                svids=store,
                attestations=self.attestations,
                attest_port=self.config.attest.port,
            )
            self.manager = manager
            try:
                async with asyncio.TaskGroup() as group:
                    group.create_task(manager.run(), name="auth-reconcile")
                    group.create_task(self._feed_cluster(manager), name="auth-cluster")
                    group.create_task(self._feed_svids(manager, store), name="auth-svids")
            finally:
                self.manager = None

    async def _feed_cluster(self, manager: AuthManager) -> None:
        async for state in self.cluster.snapshots():
            manager.cluster_changed(state)

    async def _feed_svids(self, manager: AuthManager, store: SvidStore) -> None:
        with store.subscribe() as events:
            manager.svids_changed()
            async for _ in events:
                manager.svids_changed()

    def _attestations_changed(self, peers: Collection[Peer]) -> None:
        if self.manager is not None:
            self.manager.attestations_changed(peers)

    def _auth_required(self, event: AuthRequiredEvent) -> None:
        key = event.key
        if self.manager is None:
            log.debug("auth required before the auth manager runs", local=key.local, remote=key.remote)
            return
        self.manager.auth_required(key.local, key.remote, key.remote_node)

    async def run(self) -> int:
        """Run until stopped by a signal or a critical failure; return the process exit status."""
        log.info("authd starting", node=self.config.node.name, config=str(self._config_path))
        try:
            return await self._run()
        finally:
            if self.flow_history is not None:
                self.flow_history.close()
            self._state_lock.release()

    async def _run(self) -> int:
        with self._signals(), captured(UnraisableLog()):
            serve = asyncio.create_task(self._serve(), name="serve")
            stop = asyncio.create_task(self._stop.wait(), name="stop-requested")
            await asyncio.wait({serve, stop}, return_when=asyncio.FIRST_COMPLETED)
            stop.cancel()
            self._notifier.stopping()
            if serve.done():
                return self._exit_status(serve)
            log.info("authd stopping")
            serve.cancel()
            timeout = self.config.daemon.shutdown_timeout.total_seconds()
            done, _ = await asyncio.wait({serve}, timeout=timeout)
            if not done:
                log.error("shutdown timed out, exiting anyway", timeout_s=timeout)
                return EXIT_FAILURE
            log.info("authd stopped")
            return EXIT_OK

    def request_stop(self) -> None:
        """Begin a graceful stop (what SIGTERM and SIGINT do)."""
        self._stop.set()

    async def _serve(self) -> None:
        async with asyncio.TaskGroup() as group:
            for job in self._jobs:
                group.create_task(self._supervisor.run(job), name=job.name)
            group.create_task(self._announce_ready(), name="announce-ready")
            if self._notifier.watchdog_interval is not None:
                group.create_task(self._feed_watchdog(self._notifier.watchdog_interval), name="watchdog")
            await asyncio.Future()  # runs until cancelled, or until a critical job fails

    async def _announce_ready(self) -> None:
        await self.health.wait_ready()
        log.info("authd ready")
        self._notifier.ready(self.health.summary())

    async def _feed_watchdog(self, interval: float) -> None:
        while True:
            if self.health.healthy:
                self._notifier.watchdog()
            else:
                log.warning("watchdog not fed: a component has failed", status=self.health.summary())
            self._notifier.status(self.health.summary())
            await asyncio.sleep(interval)

    def _exit_status(self, serve: asyncio.Task[None]) -> int:
        error = serve.exception()
        if isinstance(error, BaseExceptionGroup):
            failures = error.subgroup(DaemonError)
            if failures is not None:
                log.error("authd stopped after a critical failure", error=str(failures.exceptions[0]))
                return EXIT_FAILURE
            raise error
        if error is not None:
            raise error
        log.info("all jobs finished")
        return EXIT_OK

    @contextlib.contextmanager
    def _signals(self) -> Iterator[None]:
        loop = asyncio.get_running_loop()
        handled = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
        loop.add_signal_handler(signal.SIGTERM, self.request_stop)
        loop.add_signal_handler(signal.SIGINT, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, self._reload_signalled)
        try:
            yield
        finally:
            for signum in handled:
                loop.remove_signal_handler(signum)

    def reload(self) -> list[str]:
        """Re-read the config file; keep the running config if the new one is invalid (ConfigError).

        Returns the sections whose changes need a restart to apply.
        """
        self._notifier.reloading()
        try:
            new = load_config(self._config_path)
        except ConfigError as err:
            log.error("config reload rejected, keeping the running config", problems=err.problems)
            self._notifier.reloaded(self.health.summary())
            raise
        old, self.config = self.config, new
        for hook in self._reload_hooks:
            hook(old, new)
        restart_needed = _changed_sections(old, new) - {"log"} - _live_datapath_change(old, new)
        if restart_needed:
            log.warning("config reloaded; some changes need a restart", sections=sorted(restart_needed))
        else:
            log.info("config reloaded")
        self._notifier.reloaded(self.health.summary())
        return sorted(restart_needed)

    def _reload_signalled(self) -> None:
        """SIGHUP: reload; a rejection is already logged, and the running config stays."""
        with contextlib.suppress(ConfigError):
            self.reload()

    async def _serve_reload(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """The ``reload`` op (``authd reload``, the unit's ExecReload=): reload, answer with the verdict."""
        del request
        try:
            restart_needed = self.reload()
        except ConfigError as err:
            problems = "; ".join(err.problems)
            raise ControlError(f"reload: config rejected, the running one stays: {problems}") from err
        yield {"reloaded": True, "restart_needed": restart_needed}

    def _apply_logging(self, old: Config, new: Config) -> None:
        if old.log != new.log:
            logsetup.configure(new.log.level, new.log.format, logbook=self.logbook)


def _check_encryption(config: Config) -> None:
    """What the config cannot check alone: the userspace backend's binary is there (exit 78 if not)."""
    encryption = config.encryption
    binary = encryption.wireguard_go
    if (
        encryption.mode == "wireguard"
        and encryption.backend == "userspace"
        and not os.access(binary, os.X_OK)
    ):
        raise ConfigError([f'encryption.wireguard_go: {binary} is not an executable (backend = "userspace")'])


def _no_datapath(ifindex: int) -> None:
    """Where the tunnel's ifindex goes without a datapath: nowhere."""
    del ifindex


def _live_datapath_change(old: Config, new: Config) -> set[str]:
    """``{"datapath"}`` when only the datapath keys applied at run time changed."""
    live = ("flow_events", "auth_required_interval", "interfaces")
    other = [f for f in type(old.datapath).__dataclass_fields__ if f not in live]
    same = all(getattr(old.datapath, f) == getattr(new.datapath, f) for f in other)
    return {"datapath"} if same else set()


def _changed_sections(old: Config, new: Config) -> set[str]:
    """Top-level sections whose values differ."""
    return {name for name in Config.__dataclass_fields__ if getattr(old, name) != getattr(new, name)}
