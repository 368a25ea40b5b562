"""The network of a cluster on one machine: node namespaces on a shared wire, workloads attached like pods.

Layout (node ``i`` counts from 0, workload ``j`` from 0 on its node)::

    fabric netns: bridge br0 ---- up<i> === eth0 [node netns]  10.231.0.<i+1>/24, forwards
                                                 lxc<j> === eth0 [workload netns]  10.231.<i+1>.<j+10>/32

Workloads are attached the way routed CNIs attach pods: a veth whose host side (``lxc<j>``) has no
address and a /32 route, and a default route in the workload via 169.254.1.1, an address every node
holds on its loopback so it answers the workload's ARP. Nodes route each other's workload subnets over
the wire, so traffic between workloads crosses the ``lxc`` interfaces authd attaches its programs to.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from authd.devcluster.netns import Namespaces, sh, sysctl

BASE = ipaddress.IPv4Network("10.231.0.0/16")
GATEWAY = "169.254.1.1"


@dataclass(frozen=True, slots=True)
class NodeNet:
    """A node's network namespace and addresses."""

    name: str
    index: int
    netns: str
    address: ipaddress.IPv4Address
    subnet: ipaddress.IPv4Network


@dataclass(frozen=True, slots=True)
class WorkloadNet:
    """A workload's network namespace, address, and the host-side link on its node."""

    name: str
    node: NodeNet
    netns: str
    address: ipaddress.IPv4Address
    host_link: str


@dataclass
class Network:
    """Builds the topology; every namespace goes into ``namespaces`` for teardown."""

    prefix: str
    namespaces: Namespaces
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
            netns=self.namespaces.add(f"{self.prefix}-{name}"),
            address=BASE.network_address + index + 1,
            subnet=ipaddress.IPv4Network(f"{BASE.network_address + (index + 1) * 256}/24"),
        )
        uplink = f"up{index}"
        sh(
            "ip",
            "-n",
            self._fabric,
            "link",
            "add",
            uplink,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            node.netns,
        )
        sh("ip", "-n", self._fabric, "link", "set", uplink, "master", "br0", "up")
        sh("ip", "-n", node.netns, "addr", "add", f"{node.address}/24", "dev", "eth0")
        sh("ip", "-n", node.netns, "link", "set", "eth0", "up")
        sh("ip", "-n", node.netns, "addr", "add", f"{GATEWAY}/32", "dev", "lo")
        sysctl(node.netns, "net.ipv4.ip_forward", "1")
        for other in self.nodes.values():
            sh("ip", "-n", node.netns, "route", "add", str(other.subnet), "via", str(other.address))
            sh("ip", "-n", other.netns, "route", "add", str(node.subnet), "via", str(node.address))
        self.nodes[name] = node
        return node

    def add_workload(self, node_name: str, name: str) -> WorkloadNet:
        """Create a workload namespace attached to ``node_name`` by a veth pair."""
        node = self.nodes[node_name]
        index = sum(1 for w in self.workloads.values() if w.node.name == node_name)
        workload = WorkloadNet(
            name=name,
            node=node,
            netns=self.namespaces.add(f"{self.prefix}-{node_name}-{name}"),
            address=node.subnet.network_address + index + 10,
            host_link=f"lxc{index}",
        )
        host, pod = node.netns, workload.netns
        sh(
            "ip",
            "-n",
            host,
            "link",
            "add",
            workload.host_link,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            pod,
        )
        sh("ip", "-n", host, "link", "set", workload.host_link, "up")
        sh("ip", "-n", host, "route", "add", f"{workload.address}/32", "dev", workload.host_link)
        sh("ip", "-n", pod, "addr", "add", f"{workload.address}/32", "dev", "eth0")
        sh("ip", "-n", pod, "link", "set", "eth0", "up")
        sh("ip", "-n", pod, "route", "add", GATEWAY, "dev", "eth0", "scope", "link")
        sh("ip", "-n", pod, "route", "add", "default", "via", GATEWAY, "dev", "eth0")
        self.workloads[name] = workload
        return workload
