"""The network of a cluster on one machine: node namespaces on a shared wire, workloads attached like pods.

Layout (node ``i`` counts from 0, workload ``j`` from 0 on its node)::

    fabric netns: bridge br0 ---- up<i> === eth0 [node netns]  10.231.0.<i+1>/24, forwards
                                                 lxc<j> === eth0 [workload netns]  10.231.<i+1>.<j+10>/32

Workloads are attached the way routed CNIs attach pods: a veth whose host side (``lxc<j>``) has no
address and a /32 route, and a default route in the workload via 169.254.1.1, an address every node
holds on its loopback so it answers the workload's ARP. Nodes route each other's workload subnets over
the wire, so traffic between workloads crosses the ``lxc`` interfaces authd attaches its programs to.

With CNI (``ClusterSpec(cni=True)``) ``ptp`` makes each workload's veth instead (host side ``veth...``,
which holds the gateway, the first address of the node's subnet, and with ``ipv6`` also of its IPv6
subnet, as a /32 and a /128) and ``authd-cni`` attaches authd to it and records both pod addresses.

A cluster-wide service (etcd, with ``ClusterSpec(source="etcd")``) runs in the fabric namespace and
listens on ``10.231.0.250``, an address of the bridge itself.

With ``ipv6``, the same again in IPv6 (dual stack): nodes ``fd00:231::<i+1>/64`` on the wire, workloads
``fd00:231:<i+1>::<j+10>/128``, their default route via ``fe80::1``, which the host side of every
``lxc`` link holds. Duplicate address detection is off, so addresses work at once.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field, replace
from pathlib import Path

from authd.devcluster.cni import Runtime
from authd.devcluster.netns import Namespaces, sh, sysctl

BASE = ipaddress.IPv4Network("10.231.0.0/16")
GATEWAY = "169.254.1.1"
BASE6 = ipaddress.IPv6Network("fd00:231::/48")
GATEWAY6 = "fe80::1"
SERVICE_HOST = 250
"""The host number, on the wire, of the address cluster-wide services listen on (above every node's)."""


@dataclass(frozen=True, slots=True)
class NodeNet:
    """A node's network namespace and addresses."""

    name: str
    index: int
    netns: str
    address: ipaddress.IPv4Address
    subnet: ipaddress.IPv4Network
    address6: ipaddress.IPv6Address | None = None
    subnet6: ipaddress.IPv6Network | None = None


@dataclass(frozen=True, slots=True)
class WorkloadNet:
    """A workload's network namespace, address, and the host-side link on its node."""

    name: str
    node: NodeNet
    netns: str
    address: ipaddress.IPv4Address
    host_link: str
    address6: ipaddress.IPv6Address | None = None

    def addresses(self) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
        """Every address of the workload, IPv4 first."""
        return [self.address] if self.address6 is None else [self.address, self.address6]


@dataclass
class Network:
    """Builds the topology; every namespace goes into ``namespaces`` for teardown."""

    prefix: str
    namespaces: Namespaces
    ipv6: bool = False
    nodes: dict[str, NodeNet] = field(default_factory=dict)
    workloads: dict[str, WorkloadNet] = field(default_factory=dict)
    _fabric: str = ""

    def add_node(self, name: str) -> NodeNet:
        """Create a node namespace on the wire, with routes to every other node's workloads."""
        if not self._fabric:
            self._fabric = self.namespaces.add(f"{self.prefix}-fabric")
            sh("ip", "-n", self._fabric, "link", "add", "br0", "type", "bridge")
            sh("ip", "-n", self._fabric, "link", "set", "br0", "up")
        index = len(self.nodes)
        node = NodeNet(
            name=name,
            index=index,
            netns=self._namespace(f"{self.prefix}-{name}"),
            address=BASE.network_address + index + 1,
            subnet=ipaddress.IPv4Network(f"{BASE.network_address + (index + 1) * 256}/24"),
            address6=BASE6.network_address + index + 1 if self.ipv6 else None,
            subnet6=ipaddress.IPv6Network(f"{BASE6.network_address + ((index + 1) << 64)}/64")
            if self.ipv6
            else None,
        )
        uplink = f"up{index}"
        _veth(self._fabric, uplink, node.netns, "eth0")
        sh("ip", "-n", self._fabric, "link", "set", uplink, "master", "br0", "up")
        sh("ip", "-n", node.netns, "addr", "add", f"{node.address}/24", "dev", "eth0")
        sh("ip", "-n", node.netns, "link", "set", "eth0", "up")
        sh("ip", "-n", node.netns, "addr", "add", f"{GATEWAY}/32", "dev", "lo")
        sysctl(node.netns, "net.ipv4.ip_forward", "1")
        for other in self.nodes.values():
            sh("ip", "-n", node.netns, "route", "add", str(other.subnet), "via", str(other.address))
            sh("ip", "-n", other.netns, "route", "add", str(node.subnet), "via", str(node.address))
        if node.address6 is not None:
            sh("ip", "-n", node.netns, "addr", "add", f"{node.address6}/64", "dev", "eth0", "nodad")
            sysctl(node.netns, "net.ipv6.conf.all.forwarding", "1")
            for other in self.nodes.values():
                sh(
                    "ip",
                    "-n",
                    node.netns,
                    "-6",
                    "route",
                    "add",
                    str(other.subnet6),
                    "via",
                    str(other.address6),
                )
                sh(
                    "ip",
                    "-n",
                    other.netns,
                    "-6",
                    "route",
                    "add",
                    str(node.subnet6),
                    "via",
                    str(node.address6),
                )
        self.nodes[name] = node
        return node

    def service_address(self) -> tuple[str, ipaddress.IPv4Address]:
        """An address on the wire for a cluster-wide service (etcd): the fabric namespace and the address.

        The bridge itself holds it, so every node reaches it directly over its ``eth0``.
        """
        address = BASE.network_address + SERVICE_HOST
        sh("ip", "-n", self._fabric, "addr", "replace", f"{address}/24", "dev", "br0")
        return self._fabric, address

    def _namespace(self, name: str) -> str:
        """A new namespace; with IPv6, links that come up there skip duplicate address detection."""
        self.namespaces.add(name)
        if self.ipv6:
            sysctl(name, "net.ipv6.conf.all.accept_dad", "0")
            sysctl(name, "net.ipv6.conf.default.accept_dad", "0")
        return name

    def add_workload(self, node_name: str, name: str, *, attach: bool = True) -> WorkloadNet:
        """Create a workload namespace attached to ``node_name`` by a veth pair.

        Without ``attach`` only the namespace and the addresses exist; :meth:`attach_cni` makes the pod's
        network through CNI later.
        """
        node = self.nodes[node_name]
        index = sum(1 for w in self.workloads.values() if w.node.name == node_name)
        workload = WorkloadNet(
            name=name,
            node=node,
            netns=self._namespace(f"{self.prefix}-{node_name}-{name}"),
            address=node.subnet.network_address + index + 10,
            host_link=f"lxc{index}",
            address6=node.subnet6.network_address + index + 10 if node.subnet6 is not None else None,
        )
        if not attach:
            workload = replace(workload, host_link="")
            self.workloads[name] = workload
            return workload
        host, pod = node.netns, workload.netns
        _veth(host, workload.host_link, pod, "eth0")
        sh("ip", "-n", host, "link", "set", workload.host_link, "up")
        sh("ip", "-n", host, "route", "add", f"{workload.address}/32", "dev", workload.host_link)
        sh("ip", "-n", pod, "addr", "add", f"{workload.address}/32", "dev", "eth0")
        sh("ip", "-n", pod, "link", "set", "eth0", "up")
        sh("ip", "-n", pod, "route", "add", GATEWAY, "dev", "eth0", "scope", "link")
        sh("ip", "-n", pod, "route", "add", "default", "via", GATEWAY, "dev", "eth0")
        if workload.address6 is not None:
            link = workload.host_link
            sh("ip", "-n", host, "addr", "add", f"{GATEWAY6}/64", "dev", link, "scope", "link", "nodad")
            sh("ip", "-n", host, "-6", "route", "add", f"{workload.address6}/128", "dev", link)
            sh("ip", "-n", pod, "addr", "add", f"{workload.address6}/128", "dev", "eth0", "nodad")
            sh("ip", "-n", pod, "-6", "route", "add", "default", "via", GATEWAY6, "dev", "eth0")
        self.workloads[name] = workload
        return workload

    def attach_cni(self, name: str, runtime: Runtime) -> WorkloadNet:
        """Make a workload's network with a CNI conflist (``ptp``, ``host-local``, ``authd-cni``), as a pod.

        The conflist's IPAM hands out exactly the workload's addresses (IPv4, and IPv6 with ``ipv6``: one
        ``host-local`` range per family); ``ptp`` makes the veth (host side
        ``veth...``), the routes on both sides and the gateway, ``authd-cni`` attaches authd to it.
        """
        workload = self.workloads[name]
        result = runtime.add(name, Path("/run/netns") / workload.netns)
        (host_link,) = [i["name"] for i in result["interfaces"] if not i.get("sandbox")]
        workload = replace(workload, host_link=str(host_link))
        self.workloads[name] = workload
        return workload


def _veth(netns: str, name: str, peer_netns: str, peer_name: str) -> None:
    """Create a veth pair with one end in each namespace."""
    sh("ip", "-n", netns, "link", "add", name, "type", "veth", "peer", "name", peer_name, "netns", peer_netns)
