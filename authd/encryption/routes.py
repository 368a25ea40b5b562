"""Routes of remote workload prefixes through the WireGuard interface (main table, this namespace).

Routes authd adds carry their own protocol number, so a resync removes only routes it made.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable

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
            present = set()
            for family in (socket.AF_INET, socket.AF_INET6):
                for route in ipr.route("dump", family=family, oif=ifindex, proto=ROUTE_PROTOCOL):
                    if route.get_attr("RTA_OIF") != ifindex or route["proto"] != ROUTE_PROTOCOL:
                        continue
                    default = "::" if family == socket.AF_INET6 else "0.0.0.0"  # noqa: S104 - a prefix, not a bind
                    destination = route.get_attr("RTA_DST") or default
                    present.add(ipaddress.ip_network(f"{destination}/{route['dst_len']}"))
            for prefix in wanted - present:
                ipr.route("replace", dst=str(prefix), oif=ifindex, proto=ROUTE_PROTOCOL)
            for prefix in present - wanted:
                ipr.route("del", dst=str(prefix), oif=ifindex, proto=ROUTE_PROTOCOL)
    except (NetlinkError, OSError) as err:
        raise EncryptionError(f"encryption: cannot route through interface {ifindex}: {err}") from err
