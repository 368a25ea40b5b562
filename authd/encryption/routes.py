"""Routes of remote workload prefixes through the WireGuard interface (main table, this namespace).

Routes authd adds carry their own protocol number, so a resync removes only routes it made.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable, Mapping

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from authd.config.schema import IpNetwork
from authd.errors import EncryptionError

ROUTE_PROTOCOL = 197
"""rtnetlink protocol of authd's tunnel routes (unassigned in /etc/iproute2/rt_protos)."""


def sync_routes(ifindex: int, prefixes: Iterable[IpNetwork]) -> None:
    """Make the routes via ``ifindex`` that authd owns exactly ``prefixes``."""
    wanted = set(prefixes)
    try:
        with IPRoute() as ipr:
            present = {prefix for prefix, oif in _owned(ipr).items() if oif == ifindex}
            for prefix in wanted - present:
                ipr.route("replace", dst=str(prefix), oif=ifindex, proto=ROUTE_PROTOCOL)
            for prefix in present - wanted:
                ipr.route("del", dst=str(prefix), oif=ifindex, proto=ROUTE_PROTOCOL)
    except (NetlinkError, OSError) as err:
        raise EncryptionError(f"encryption: cannot route through interface {ifindex}: {err}") from err


def move_routes(wanted: Mapping[IpNetwork, int]) -> None:
    """Make authd's routes exactly ``wanted`` (prefix to interface index), whichever interfaces they use.

    A prefix that moves to another interface is replaced in place, never deleted first: traffic to it
    always has a route. Routes authd owns that are not wanted are removed after the moves.
    """
    try:
        with IPRoute() as ipr:
            owned = _owned(ipr)
            for prefix, ifindex in wanted.items():
                if owned.get(prefix) != ifindex:
                    ipr.route("replace", dst=str(prefix), oif=ifindex, proto=ROUTE_PROTOCOL)
            for prefix, ifindex in _owned(ipr).items():
                if prefix not in wanted:
                    ipr.route("del", dst=str(prefix), oif=ifindex, proto=ROUTE_PROTOCOL)
    except (NetlinkError, OSError) as err:
        raise EncryptionError(f"encryption: cannot route through the tunnel interfaces: {err}") from err


def _owned(ipr: IPRoute) -> dict[IpNetwork, int]:
    """The routes with authd's protocol number: prefix to interface index."""
    owned: dict[IpNetwork, int] = {}
    for family in (socket.AF_INET, socket.AF_INET6):
        for route in ipr.route("dump", family=family, proto=ROUTE_PROTOCOL):
            if route["proto"] != ROUTE_PROTOCOL or route.get_attr("RTA_OIF") is None:
                continue
            default = "::" if family == socket.AF_INET6 else "0.0.0.0"  # noqa: S104 - a prefix, not a bind
            destination = route.get_attr("RTA_DST") or default
            owned[ipaddress.ip_network(f"{destination}/{route['dst_len']}")] = route.get_attr("RTA_OIF")
    return owned
