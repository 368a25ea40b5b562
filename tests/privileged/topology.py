"""A node in a network namespace with two workloads, each in its own namespace behind a veth pair.

    netns A (workload) eth0 10.201.1.2 ── adpXXXXa ┐
                                                     netns H (the node; authd attaches here, routes)
    netns B (workload) eth0 10.201.2.2 ── adpXXXXb ┘

Like a routed CNI, the node routes between workloads through the host-side veths, which is where authd's
programs go, with a host route per workload address (``10.201.1.2/32 dev adpXXXXa``), from which authd
learns which interface owns which address. IPv6 runs alongside (fd00:201:1::2, fd00:201:2::2).
Everything is deleted on close.
"""

from __future__ import annotations

import secrets
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from authd.datapath.netns import run_in_netns
from authd.datapath.ownership import Endpoints, Plan, plan, read_route_table

T = TypeVar("T")

A4, B4 = "10.201.1.2", "10.201.2.2"
A6, B6 = "fd00:201:1::2", "fd00:201:2::2"


def sh(*args: str) -> str:
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout


class Topology:
    def __init__(self, *, third: bool = False) -> None:
        """``third``: a third workload C (10.201.3.2, fd00:201:3::2 behind adpXXXXc)."""
        self.tag = secrets.token_hex(2)
        self.node = f"adp-{self.tag}-h"
        self.a = f"adp-{self.tag}-a"
        self.b = f"adp-{self.tag}-b"
        self.c = f"adp-{self.tag}-c"
        self.link_a = f"adp{self.tag}a"
        self.link_b = f"adp{self.tag}b"
        self.link_c = f"adp{self.tag}c"
        self._third = third
        self._made: list[str] = []
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def path(self, netns: str) -> Path:
        return Path("/run/netns") / netns

    def _build(self) -> None:
        workloads = [(self.a, self.link_a, 1), (self.b, self.link_b, 2)]
        if self._third:
            workloads.append((self.c, self.link_c, 3))
        for ns in (self.node, *(w[0] for w in workloads)):
            sh("ip", "netns", "add", ns)
            self._made.append(ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            # No duplicate address detection: link-local addresses would stay tentative for a second or
            # two, and neighbour discovery with them.
            for key in ("net.ipv6.conf.default.accept_dad=0", "net.ipv6.conf.all.accept_dad=0"):
                sh("nsenter", f"--net={self.path(ns)}", "sysctl", "-qw", key)
        for ns, link, net in workloads:
            sh(
                "ip",
                "link",
                "add",
                link,
                "netns",
                self.node,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                ns,
            )
            sh("ip", "-n", self.node, "addr", "add", f"10.201.{net}.1/24", "dev", link)
            sh("ip", "-n", self.node, "addr", "add", f"fd00:201:{net}::1/64", "dev", link, "nodad")
            sh("ip", "-n", self.node, "link", "set", link, "up")
            sh("ip", "-n", self.node, "route", "add", f"10.201.{net}.2/32", "dev", link)
            sh("ip", "-n", self.node, "-6", "route", "add", f"fd00:201:{net}::2/128", "dev", link)
            sh("ip", "-n", ns, "addr", "add", f"10.201.{net}.2/24", "dev", "eth0")
            sh("ip", "-n", ns, "addr", "add", f"fd00:201:{net}::2/64", "dev", "eth0", "nodad")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")
            sh("ip", "-n", ns, "route", "add", "default", "via", f"10.201.{net}.1")
            sh("ip", "-n", ns, "-6", "route", "add", "default", "via", f"fd00:201:{net}::1")
        for key in ("net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"):
            sh("nsenter", f"--net={self.path(self.node)}", "sysctl", "-qw", key)

    def run(self, netns: str, fn: Callable[[], T]) -> T:
        return run_in_netns(self.path(netns), fn)

    def ifindex(self, link: str) -> int:
        return self.run(self.node, lambda: socket.if_nametoindex(link))

    def learn_ownership(self, endpoints: Endpoints) -> Plan:
        """Write the endpoints map from the node's routes, the way authd does."""
        table = self.run(self.node, read_route_table)
        result = plan(table, (f"adp{self.tag}*",), endpoints.items())
        endpoints.update_many(result.upserts)
        endpoints.delete_many(result.deletes)
        return result

    def close(self) -> None:
        for ns in reversed(self._made):
            subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)
        self._made.clear()
