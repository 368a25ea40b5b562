"""The datapath inside the daemon: load or reuse the pins, attach to interfaces, consume events.

Jobs:
- ``datapath`` (critical): loads the object (reusing pinned maps), writes the runtime config, attaches to
  matching interfaces and keeps watching for new ones. Without a loaded datapath authd has nothing to
  enforce with, so a load failure stops the daemon (systemd restarts it); the programs attached by the
  previous run keep enforcing with the pinned maps meanwhile. Netlink trouble is retried inside the job.
- ``endpoint-ownership`` (not critical): keeps the endpoints map (which workload interface owns which
  address) in sync with the node's host routes (:mod:`authd.datapath.ownership`). The ``datapath`` job
  runs one reconcile before it reports ready, so that no workload's own traffic is dropped as spoofed
  once authd says it enforces; a failure later is retried with backoff, entries stay as they are.
- ``datapath-events`` (not critical): the consumer of both ring buffers (auth-required, flows).
  Enforcement does not depend on it, so a failure is restarted with backoff rather than taking the
  daemon down.

Stopping detaches nothing: enforcement continues while authd restarts (``authd bpf unload`` detaches).

Attach order: every ``datapath.order_check_interval``, and on every link event for an attached
interface, the ``datapath`` job asks the kernel which programs run before authd's on each attached
interface (:meth:`Attacher.ahead`). With tcx and ``datapath.reassert_first`` it puts authd's links first
again (a new first link, then the old one detached: no unenforced moment) and counts it. Whatever is
still ahead afterwards (a tcx program while authd fell back to tc, a failed re-placement, or
``reassert_first = false``) makes the component degraded with the interface and program named.

Link pins: when a link goes away, once the existing links are attached, and every
``datapath.order_check_interval``, the ``datapath`` job removes the pins of tcx links whose interface is
gone (:meth:`Attacher.collect_defunct`), so pod churn leaves no pins behind, including pods removed
while authd was down.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import structlog

from authd.backoff import BackoffFactory
from authd.config.model import DatapathConfig
from authd.datapath import links, loader
from authd.datapath.attach import AttachMode
from authd.datapath.consumer import EventConsumer, OnAuthRequired, OnFlow
from authd.datapath.layout import Direction, FlowLevel
from authd.datapath.links import Link, LinkWatcher
from authd.datapath.loader import Datapath, MapSizes
from authd.datapath.maps import PinnedMaps, RuntimeConfig
from authd.datapath.ownership import RouteOwnership
from authd.datapath.ringbuf import RingBuffer
from authd.errors import DatapathError
from authd.health import Component
from authd.jobs import Job

log = structlog.get_logger(__name__)

_FLOW_LEVELS = {
    "none": FlowLevel.NONE,
    "denied": FlowLevel.DENIED,
    "first": FlowLevel.FIRST,
    "all": FlowLevel.ALL,
}


def runtime_config(config: DatapathConfig) -> RuntimeConfig:
    """What the programs read at run time, from the ``[datapath]`` section."""
    interval_ns = round(config.auth_required_interval.total_seconds() * 1e9)
    return RuntimeConfig(_FLOW_LEVELS[config.flow_events], interval_ns)


def map_sizes(config: DatapathConfig) -> MapSizes:
    """Configured map sizes."""
    return MapSizes(
        ipcache=config.ipcache_entries,
        policy=config.policy_entries,
        auth=config.auth_map_entries,
        events_bytes=config.events_ring_bytes,
        flows=config.flow_table_entries,
    )


@dataclass(frozen=True, slots=True)
class DatapathSnapshot:
    """What metrics and ``authd status`` show of the running datapath, read when they ask."""

    counters: dict[str, int]
    auth_capacity: int
    interfaces: tuple[str, ...]
    events_decoded: int
    events_malformed: int
    attach_mode: str = ""
    ahead: dict[str, tuple[str, ...]] = field(default_factory=dict)  # interface -> foreign programs
    reassertions: int = 0
    verdicts: dict[tuple[str, Direction], int] = field(default_factory=dict)  # (counter, direction)


class Enforcement:
    """Owns the loaded datapath for the daemon's lifetime."""

    def __init__(
        self,
        config: DatapathConfig,
        component: Component,
        *,
        on_auth_required: OnAuthRequired,
        on_flow: OnFlow,
        backoff: BackoffFactory,
    ) -> None:
        """Nothing touches the kernel until the jobs run."""
        self._config = config
        self._component = component
        self._on_auth_required = on_auth_required
        self._on_flow = on_flow
        self._loaded = asyncio.Event()
        self.datapath: Datapath | None = None
        self.watcher = LinkWatcher(
            config.interfaces, self._attach, backoff, recheck=self._recheck, removed=self._removed
        )
        self.ahead: dict[str, tuple[str, ...]] = {}
        self.reassertions = 0
        self.consumer: EventConsumer | None = None
        self._rescans: set[asyncio.Task[None]] = set()
        self._backoff = backoff
        self.ownership: RouteOwnership | None = None
        self._stale_drained = False
        self.tunnel_ifindex = 0

    def set_tunnel(self, ifindex: int) -> None:
        """The WireGuard interface's index (0: none), for the datapath's tunnel check.

        Only kept here: the check that reads it (datapath config map) is not in this version.
        """
        self.tunnel_ifindex = ifindex

    async def wait_loaded(self) -> Datapath:
        """Return the datapath once the ``datapath`` job has loaded it."""
        await self._loaded.wait()
        assert self.datapath is not None  # set before _loaded
        return self.datapath

    def snapshot(self) -> DatapathSnapshot | None:
        """Counters, auth map capacity and attached interfaces; None while no datapath is loaded."""
        datapath = self.datapath
        if datapath is None:
            return None
        try:
            with datapath.maps() as maps:
                counters, capacity = maps.counters.read(), maps.auth.capacity
                verdicts = maps.verdicts.read_by_direction()
        except DatapathError as err:  # pins removed under a running daemon (`authd bpf unload`)
            log.debug("datapath maps unreadable", error=str(err))
            return None
        consumer = self.consumer
        return DatapathSnapshot(
            counters=counters,
            verdicts=verdicts,
            auth_capacity=capacity,
            interfaces=tuple(sorted(link.name for link in self.watcher.attached.values())),
            events_decoded=consumer.decoded if consumer is not None else 0,
            events_malformed=consumer.malformed if consumer is not None else 0,
            attach_mode=str(datapath.attacher.mode),
            ahead=dict(self.ahead),
            reassertions=self.reassertions,
        )

    def jobs(self) -> list[Job]:
        """The daemon jobs that run the datapath."""
        return [
            Job("datapath", self.run, critical=True),
            Job("endpoint-ownership", self.run_ownership, critical=False),
            Job("datapath-events", self.run_events, critical=False),
        ]

    def _attach(self, link: Link) -> None:
        if self.datapath is None:
            return
        self.datapath.attach(link.index, l3=loader.is_l3_link(link.link_type))

    def _recheck(self, link: Link) -> None:
        """A link event for an attached interface: check the order on it now."""
        self._check_order([link])
        self._report()

    def _removed(self, _link: Link) -> None:
        self._collect_defunct()

    def _collect_defunct(self) -> None:
        """Remove the pins of links whose interface is gone; a failure is logged, the next sweep retries."""
        if self.datapath is None:
            return
        try:
            removed = self.datapath.attacher.collect_defunct()
        except DatapathError as err:
            log.warning("cannot remove pins of defunct links", error=str(err))
            return
        if removed:
            log.info("removed pins of defunct links", pins=removed)

    def _check_order(self, attached: list[Link]) -> None:
        datapath = self.datapath
        if datapath is None:
            return
        attacher = datapath.attacher
        for link in attached:
            l3 = loader.is_l3_link(link.link_type)
            try:
                foreign = attacher.ahead(link.index, l3=l3)
                if foreign and self._config.reassert_first and attacher.mode is AttachMode.TCX:
                    attacher.reassert_first(link.index, l3=l3, spare=datapath.spare_programs())
                    self.reassertions += 1
                    log.warning(
                        "programs ran ahead of authd's; authd placed first again",
                        interface=link.name,
                        ifindex=link.index,
                        programs=[f.describe() for f in foreign],
                    )
                    foreign = attacher.ahead(link.index, l3=l3)
            except DatapathError as err:
                # The link vanished meanwhile, or the kernel refused: try again at the next check.
                log.warning("cannot check attach order", interface=link.name, error=str(err))
                continue
            key = f"{link.name} (ifindex {link.index})"
            if foreign:
                described = tuple(f.describe() for f in foreign)
                if self.ahead.get(key) != described:
                    log.warning("programs run ahead of authd's", interface=link.name, programs=described)
                self.ahead[key] = described
            else:
                self.ahead.pop(key, None)

    async def _watch_order(self) -> None:
        interval = self._config.order_check_interval.total_seconds()
        while True:
            await asyncio.sleep(interval)
            attached = list(self.watcher.attached.values())
            self._collect_defunct()
            self._check_order(attached)
            known = {f"{link.name} (ifindex {link.index})" for link in attached}
            for key in set(self.ahead) - known:  # detached or gone
                del self.ahead[key]
            self._report()

    def _report(self) -> None:
        count = len(self.watcher.attached)
        if self.ahead:
            where = "; ".join(f"{key}: {', '.join(progs)}" for key, progs in sorted(self.ahead.items()))
            self._component.degraded(f"programs run ahead of authd's, unchecked traffic may pass: {where}")
        elif not self._config.interfaces:
            self._component.ready("loaded; no interfaces configured (datapath.interfaces)")
        elif count == 0:
            self._component.ready("loaded; no interface matches datapath.interfaces yet")
        else:
            self._component.ready(f"attached to {count} interfaces")

    async def run(self) -> None:
        """Load, attach, then keep attaching to new matching interfaces until cancelled."""
        datapath = await asyncio.to_thread(
            Datapath.load,
            self._config.pin_dir,
            map_sizes(self._config),
            mode=AttachMode(self._config.attach_mode),
        )
        maps: PinnedMaps | None = None
        try:
            datapath.configure(runtime_config(self._config))
            maps = datapath.maps()
            self.ownership = RouteOwnership(self._config.interfaces, maps.endpoints, self._backoff)
            await self.ownership.reconcile()
            self.datapath = datapath
            self._loaded.set()
            # The watcher attaches to existing links right after subscribing to link events, then reports.
            async with asyncio.TaskGroup() as group:
                group.create_task(self.watcher.run(on_synced=self._synced), name="datapath-links")
                group.create_task(self._watch_order(), name="datapath-order")
        finally:
            self._loaded.clear()
            self.datapath = None
            self.ownership = None
            if maps is not None:
                maps.close()
            datapath.close()  # programs stay attached, maps stay pinned

    def _synced(self) -> None:
        self._collect_defunct()
        self._check_order(list(self.watcher.attached.values()))
        self._report()

    async def run_ownership(self) -> None:
        """Keep the endpoints map in sync with the routes once the datapath is loaded."""
        await self._loaded.wait()
        assert self.ownership is not None  # set before _loaded
        await self.ownership.run()

    async def run_events(self) -> None:
        """Consume the ring buffer once the datapath is loaded."""
        await self._loaded.wait()
        assert self.datapath is not None  # set before _loaded
        flow_ring = RingBuffer(self.datapath.events_fd())
        try:
            auth_ring = RingBuffer(self.datapath.auth_events_fd())
        except BaseException:
            flow_ring.close()
            raise
        try:
            self.consumer = EventConsumer(auth_ring, flow_ring, self._on_auth_required, self._on_flow)
            # Records from before this process started are stale; after a restart of this job they are not.
            drain, self._stale_drained = not self._stale_drained, True
            await self.consumer.run(drain_stale=drain)
        finally:
            auth_ring.close()
            flow_ring.close()

    def reload(self, new: DatapathConfig) -> None:
        """Apply live-changeable settings: flow level, rate-limit interval and interface patterns."""
        old, self._config = self._config, new
        if self.datapath is None:
            return
        if runtime_config(old) != runtime_config(new):
            self.datapath.configure(runtime_config(new))
            log.info("datapath runtime config applied", flow_events=new.flow_events)
        if old.interfaces != new.interfaces:
            self.watcher.patterns = new.interfaces
            if self.ownership is not None:
                self.ownership.patterns = new.interfaces  # applied on the next route event or resync
            for index, link in list(self.watcher.attached.items()):
                if not links.matches(link.name, new.interfaces):
                    self.datapath.detach(index)
                    self.watcher.forget(index)
                    log.info("detached from interface", interface=link.name, ifindex=index)
            # Reload hooks run in the event loop's signal handler: attach from a task.
            task = asyncio.get_running_loop().create_task(self._rescan(), name="datapath-rescan")
            self._rescans.add(task)
            task.add_done_callback(self._rescans.discard)

    async def _rescan(self) -> None:
        try:
            await self.watcher.attach_existing()
        except DatapathError as err:
            log.warning("cannot attach after reload; new links still attach as they appear", error=str(err))
        self._report()
