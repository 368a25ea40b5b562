"""Which workload interface owns each local workload address: the endpoints map, learned from routes.

A routed CNI leaves one host route per pod address through the pod's host-side interface
(``10.0.1.5/32 dev lxc3``, ``fd00::5/128 dev lxc3``). Every such route in the main table whose interface
matches ``[datapath] interfaces`` becomes an endpoints entry with ENDPOINT_F_ROUTE, except a route to an
address the node holds itself (an IPv6 gateway address on a pod's veth). The map is reconciled
from a full dump of links and routes at start, on every route or link event (RTMGRP_LINK and the IPv4
and IPv6 route groups), and every ``RESYNC_S`` seconds in case an event was lost.

Entries the CNI plugin recorded (ENDPOINT_F_CNI) are kept while their interface exists, even without a
route: the plugin writes them while authd may be down. Every entry whose interface is gone is deleted.
Dumps run in a thread (pyroute2's blocking IPRoute), so nothing blocks the event loop; a dump the kernel
interrupts (NetlinkDumpInterrupted: routes changed meanwhile) is retried.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from ipaddress import ip_address, ip_network
from typing import Protocol

import structlog
from pyroute2 import AsyncIPRoute, IPRoute
from pyroute2.netlink.exceptions import NetlinkDumpInterrupted, NetlinkError
from pyroute2.netlink.rtnl import RTMGRP_IPV4_ROUTE, RTMGRP_IPV6_ROUTE, RTMGRP_LINK

from authd.backoff import BackoffFactory
from authd.datapath.layout import ENDPOINT_F_CNI, ENDPOINT_F_ROUTE
from authd.datapath.links import matches
from authd.datapath.maps import EndpointOwner, Network
from authd.errors import DatapathError

log = structlog.get_logger(__name__)

RESYNC_S = 30.0
DUMP_ATTEMPTS = 5
_MAIN_TABLE = 254
_RTN_UNICAST = 1
_HOST_PREFIX = {socket.AF_INET: 32, socket.AF_INET6: 128}


class Endpoints(Protocol):
    """What the reconciler needs of the endpoints map (:class:`~authd.datapath.maps.EndpointsMap`)."""

    def items(self) -> list[tuple[Network, EndpointOwner]]:
        """Every prefix with its owner."""
        ...

    def update_many(self, entries: Mapping[Network, EndpointOwner]) -> None:
        """Write many prefixes."""
        ...

    def delete_many(self, networks: Iterable[Network]) -> int:
        """Delete prefixes."""
        ...


@dataclass(frozen=True, slots=True)
class HostRoute:
    """A route to one address straight through an interface (no gateway)."""

    network: Network
    ifindex: int


@dataclass(frozen=True, slots=True)
class RouteTable:
    """The links (index -> name) and host routes of a network namespace at one moment."""

    links: Mapping[int, str]
    routes: tuple[HostRoute, ...]


@dataclass(frozen=True, slots=True)
class Plan:
    """What a reconcile writes and deletes."""

    upserts: dict[Network, EndpointOwner]
    deletes: list[Network]


def plan(
    table: RouteTable, patterns: Iterable[str], current: Iterable[tuple[Network, EndpointOwner]]
) -> Plan:
    """The writes that make the endpoints map match the routes, keeping live CNI-recorded entries."""
    wanted = {
        r.network: r.ifindex
        for r in table.routes
        if r.ifindex in table.links and matches(table.links[r.ifindex], patterns)
    }
    upserts: dict[Network, EndpointOwner] = {}
    deletes: list[Network] = []
    seen: set[Network] = set()
    for network, owner in current:
        seen.add(network)
        routed = wanted.get(network)
        if owner.flags & ENDPOINT_F_CNI and owner.ifindex in table.links:
            flags = ENDPOINT_F_CNI | (ENDPOINT_F_ROUTE if routed == owner.ifindex else 0)
            if flags != owner.flags:
                upserts[network] = EndpointOwner(owner.ifindex, flags)
            if routed is not None and routed != owner.ifindex:
                log.warning(
                    "route and CNI disagree on an endpoint's interface; the CNI's record is kept",
                    prefix=str(network),
                    cni_ifindex=owner.ifindex,
                    route_ifindex=routed,
                )
        elif routed is None:
            deletes.append(network)
        elif owner != EndpointOwner(routed, ENDPOINT_F_ROUTE):
            upserts[network] = EndpointOwner(routed, ENDPOINT_F_ROUTE)
    for network, ifindex in wanted.items():
        if network not in seen:
            upserts[network] = EndpointOwner(ifindex, ENDPOINT_F_ROUTE)
    return Plan(upserts, deletes)


def _host_routes(ipr: IPRoute) -> tuple[HostRoute, ...]:
    # The node's own addresses are never a workload's, though a /128 address on a pod's interface (ptp
    # puts the IPv6 gateway on every pod veth) leaves a host route through it, as a pod route does.
    own = {ip_address(m.get("IFA_LOCAL") or m.get("IFA_ADDRESS")) for m in ipr.get_addr()}
    routes = []
    for family, full in _HOST_PREFIX.items():
        for msg in ipr.get_routes(family=family, table=_MAIN_TABLE):
            if msg["dst_len"] != full or msg["type"] != _RTN_UNICAST or msg.get("RTA_GATEWAY"):
                continue
            dst, oif = msg.get("RTA_DST"), msg.get("RTA_OIF")
            if isinstance(dst, str) and isinstance(oif, int):
                network = ip_network(f"{dst}/{full}")
                if network.network_address not in own:
                    routes.append(HostRoute(network, oif))
    return tuple(routes)


def read_route_table() -> RouteTable:
    """Dump links and host routes of the calling thread's network namespace (blocking)."""
    for _ in range(DUMP_ATTEMPTS):
        try:
            with IPRoute() as ipr:
                links = {int(m["index"]): str(m.get("IFLA_IFNAME")) for m in ipr.get_links()}
                return RouteTable(links, _host_routes(ipr))
        except NetlinkDumpInterrupted:
            continue  # the table changed during the dump: take it again
        except NetlinkError as err:
            raise DatapathError(f"datapath: cannot dump routes: {err}") from err
    raise DatapathError(f"datapath: route dump interrupted {DUMP_ATTEMPTS} times in a row")


class RouteOwnership:
    """Keeps the endpoints map in sync with the host routes through workload interfaces."""

    def __init__(self, patterns: tuple[str, ...], endpoints: Endpoints, backoff: BackoffFactory) -> None:
        """``patterns``: the interfaces authd enforces on (``[datapath] interfaces``)."""
        self.patterns = patterns
        self._endpoints = endpoints
        self._backoff = backoff
        self.reconciles = 0

    async def reconcile(self) -> Plan:
        """Dump (in a thread) and write the difference."""
        table = await asyncio.to_thread(read_route_table)
        result = plan(table, self.patterns, self._endpoints.items())
        if result.deletes:
            self._endpoints.delete_many(result.deletes)
        if result.upserts:
            self._endpoints.update_many(result.upserts)
        self.reconciles += 1
        if result.deletes or result.upserts:
            log.info("endpoint ownership updated", written=len(result.upserts), deleted=len(result.deletes))
        return result

    async def run(self) -> None:
        """Reconcile on route and link events and every RESYNC_S; reconnects with backoff."""
        backoff = self._backoff()
        while True:
            try:
                await self._watch(backoff.reset)
            except (NetlinkError, OSError, DatapathError) as err:
                delay = backoff.next_delay()
                log.warning("route watch failed, retrying", error=str(err), retry_in_s=round(delay, 3))
                await asyncio.sleep(delay)

    async def _watch(self, on_synced: Callable[[], None]) -> None:
        changed = asyncio.Event()
        async with AsyncIPRoute() as events:
            # Subscribe before the dump so that a change in between is not missed.
            await events.bind(groups=RTMGRP_LINK | RTMGRP_IPV4_ROUTE | RTMGRP_IPV6_ROUTE)

            async def listen() -> None:
                while True:
                    async for _ in events.get():
                        changed.set()

            listener = asyncio.create_task(listen(), name="endpoint-route-events")
            try:
                while True:
                    changed.clear()
                    await self.reconcile()
                    on_synced()
                    try:
                        await asyncio.wait_for(_until(changed, listener), RESYNC_S)
                    except TimeoutError:
                        continue
            finally:
                listener.cancel()
                await asyncio.gather(listener, return_exceptions=True)


async def _until(changed: asyncio.Event, listener: asyncio.Task[None]) -> None:
    """Wait for a change; re-raise the listener's failure if it died instead."""
    waiter = asyncio.ensure_future(changed.wait())
    try:
        await asyncio.wait({waiter, listener}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
    if listener.done() and not listener.cancelled():
        listener.result()
