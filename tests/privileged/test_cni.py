"""authd-cni against the CNI reference plugins (``ptp``, ``bridge``, ``host-local``), run like a runtime."""

from __future__ import annotations

import secrets
import socket
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from ipaddress import ip_interface, ip_network
from pathlib import Path
from typing import Any

import pytest

from authd.datapath import tcx
from authd.datapath.attach import Attacher
from authd.datapath.layout import AuthType, Direction
from authd.datapath.loader import Datapath, attached_prog_ids
from authd.datapath.maps import AuthKey, EndpointOwner, IpcacheEntry, PinnedMaps, PolicyKey
from authd.datapath.netns import run_in_netns
from authd.devcluster.cni import REFERENCE_PLUGINS, PluginError, Runtime, bin_dir, conflist
from tests.privileged.daemon import Authd
from tests.privileged.test_datapath_netns import PORT, EchoServer
from tests.privileged.topology import B4, B6, Topology, sh

pytestmark = pytest.mark.privileged

P, B = 500, 400
ENDPOINT_F_CNI = 0x2


@pytest.fixture
def pod_netns() -> Iterator[Path]:
    name = f"adp-pod-{secrets.token_hex(3)}"
    sh("ip", "netns", "add", name)
    try:
        yield Path("/run/netns") / name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)


def runtime(topology: Topology, tmp_path: Path, pin_dir: Path, kind: str, *, ipv6: bool = False) -> Runtime:
    net = conflist(
        kind,
        subnet="10.204.0.0/24" if kind == "ptp" else "10.205.0.0/24",
        subnet6=("fd00:204::/64" if kind == "ptp" else "fd00:205::/64") if ipv6 else "",
        data_dir=tmp_path / "ipam",
        pin_dir=pin_dir,
        bridge=f"adp{topology.tag}br",
    )
    return Runtime(topology.path(topology.node), net, [bin_dir(tmp_path), REFERENCE_PLUGINS])


def host_veth(result: dict[str, Any]) -> str:
    names = [i["name"] for i in result["interfaces"] if not i.get("sandbox") and i["name"].startswith("veth")]
    assert len(names) == 1, result
    return str(names[0])


def pod_address(result: dict[str, Any]) -> str:
    return str(ip_interface(result["ips"][0]["address"]).ip)


def link_ids(topology: Topology, index: int) -> list[int]:
    hooks = (tcx.BPF_TCX_INGRESS, tcx.BPF_TCX_EGRESS)
    return topology.run(topology.node, lambda: [e.link_id for h in hooks for e in tcx.query(index, h)])


@pytest.mark.parametrize("kind", ["ptp", "bridge"])
def test_add_check_del_with_the_reference_plugins(
    topology: Topology, datapath: Datapath, maps: PinnedMaps, pod_netns: Path, tmp_path: Path, kind: str
) -> None:
    cni = runtime(topology, tmp_path, datapath.pin_dir, kind)
    result = cni.add("pod1", pod_netns)
    assert result["cniVersion"] == "1.0.0"
    veth, address = host_veth(result), pod_address(result)
    index = topology.ifindex(veth)
    ours = datapath.attacher.prog_ids
    ingress, egress = topology.run(topology.node, lambda: attached_prog_ids(index))
    assert {ingress, egress} <= ours
    assert maps.endpoints.get(f"{address}/32") == EndpointOwner(index, ENDPOINT_F_CNI)
    if kind == "bridge":  # the bridge is in prevResult too, without a sandbox: it gets nothing
        bridge = topology.ifindex(f"adp{topology.tag}br")
        assert topology.run(topology.node, lambda: attached_prog_ids(bridge)) == (None, None)
    cni.check("pod1", pod_netns)

    links = link_ids(topology, index)
    again = cni.run_plugin(cni.conflist["plugins"][1], "ADD", "pod1", pod_netns, result)  # a retried ADD
    assert again == result  # prevResult, unchanged
    assert link_ids(topology, index) == links
    assert len(links) == 2

    with Attacher(datapath.pin_dir) as attacher:
        topology.run(topology.node, lambda: attacher.detach(index))
    with pytest.raises(PluginError) as failed:
        cni.check("pod1", pod_netns)
    assert failed.value.plugin == "authd-cni"
    assert failed.value.error["code"] == 100
    cni.run_plugin(cni.conflist["plugins"][1], "ADD", "pod1", pod_netns, result)
    cni.check("pod1", pod_netns)

    cni.delete("pod1", pod_netns)
    assert maps.endpoints.get(f"{address}/32") is None
    assert not list((datapath.pin_dir / "links").glob(f"*_{index}_*"))
    cni.results["pod1"] = result
    cni.delete("pod1", pod_netns)  # everything gone already: DEL still succeeds


def pod_connects_to(netns: Path, server: str, timeout: float = 0.6) -> bool:
    family = socket.AF_INET6 if ":" in server else socket.AF_INET
    sock = run_in_netns(netns, lambda: socket.socket(family, socket.SOCK_STREAM))
    sock.settimeout(timeout)
    try:
        sock.connect((server, PORT))
        sock.sendall(b"hello")
        return sock.recv(64) == b"hello"
    except OSError:
        return False
    finally:
        sock.close()


@pytest.mark.parametrize("kind", ["ptp", "bridge"])
def test_dual_stack_add_check_del_records_and_enforces_both_addresses(
    topology: Topology, datapath: Datapath, maps: PinnedMaps, pod_netns: Path, tmp_path: Path, kind: str
) -> None:
    # host-local with an IPv4 and an IPv6 range, as a runtime configures a dual-stack network: the pod
    # gets an address of each family, authd-cni records both as owned by the pod's veth, and the
    # programs judge the pod's IPv6 as they do its IPv4.
    sh("nsenter", f"--net={pod_netns}", "sysctl", "-qw", "net.ipv6.conf.default.accept_dad=0")
    cni = runtime(topology, tmp_path, datapath.pin_dir, kind, ipv6=True)
    result = cni.add("pod1", pod_netns)
    addresses = sorted((ip_interface(i["address"]).ip for i in result["ips"]), key=lambda a: a.version)
    assert [a.version for a in addresses] == [4, 6], result
    address4, address6 = (str(a) for a in addresses)
    index = topology.ifindex(host_veth(result))
    assert maps.endpoints.get(f"{address4}/32") == EndpointOwner(index, ENDPOINT_F_CNI)
    assert maps.endpoints.get(f"{address6}/128") == EndpointOwner(index, ENDPOINT_F_CNI)
    cni.check("pod1", pod_netns)
    maps.endpoints.delete_many([ip_network(f"{address6}/128")])
    with pytest.raises(PluginError) as failed:
        cni.check("pod1", pod_netns)  # CHECK sees the IPv6 entry missing
    assert address6 in failed.value.error["details"]
    cni.run_plugin(cni.conflist["plugins"][1], "ADD", "pod1", pod_netns, result)  # a retried ADD repairs it
    cni.check("pod1", pod_netns)

    server = EchoServer(topology)
    try:
        maps.ipcache.update_many(
            {
                ip_network(f"{address4}/32"): IpcacheEntry(P, 0),
                ip_network(f"{address6}/128"): IpcacheEntry(P, 0),
                ip_network(f"{B4}/32"): IpcacheEntry(B, 0),
                ip_network(f"{B6}/128"): IpcacheEntry(B, 0),
            }
        )
        assert pod_connects_to(pod_netns, B6, timeout=3)  # no policy: passes (neighbours resolved)
        maps.policy.update_many({PolicyKey(P, B, Direction.EGRESS): AuthType.SPIRE})
        before = maps.counters.read()["denied_auth_required"]
        assert not pod_connects_to(pod_netns, B6)
        assert not pod_connects_to(pod_netns, B4)
        assert maps.counters.read()["denied_auth_required"] > before
        maps.auth.update_many({AuthKey(P, B, 0): datetime.now(UTC) + timedelta(minutes=1)})
        assert pod_connects_to(pod_netns, B6)
        assert pod_connects_to(pod_netns, B4)
        assert maps.counters.read()["denied_source_not_owned"] == 0
    finally:
        server.close()

    cni.delete("pod1", pod_netns)
    assert maps.endpoints.get(f"{address4}/32") is None
    assert maps.endpoints.get(f"{address6}/128") is None
    assert not list((datapath.pin_dir / "links").glob(f"*_{index}_*"))


def test_del_after_the_veth_went_removes_its_link_pins(
    topology: Topology, datapath: Datapath, maps: PinnedMaps, pod_netns: Path, tmp_path: Path
) -> None:
    # Runtimes usually delete the pod's namespace, and its veth with it, before they call DEL.
    cni = runtime(topology, tmp_path, datapath.pin_dir, "ptp")
    result = cni.add("pod1", pod_netns)
    veth, address = host_veth(result), pod_address(result)
    index = topology.ifindex(veth)
    pins = datapath.pin_dir / "links"
    assert len(list(pins.glob(f"*_{index}_*"))) == 2
    sh("ip", "-n", topology.node, "link", "del", veth)
    assert len(list(pins.glob(f"*_{index}_*"))) == 2  # defunct links, still pinned
    cni.delete("pod1", pod_netns)
    assert not list(pins.glob(f"*_{index}_*"))
    assert maps.endpoints.get(f"{address}/32") is None


def test_add_fails_closed_when_authd_never_ran(topology: Topology, pod_netns: Path, tmp_path: Path) -> None:
    cni = runtime(topology, tmp_path, Path(f"/sys/fs/bpf/adp-none-{secrets.token_hex(3)}"), "ptp")
    with pytest.raises(PluginError) as failed:
        cni.add("pod1", pod_netns)
    assert failed.value.plugin == "authd-cni"
    assert failed.value.error["code"] == 11  # try again later
    assert "start authd on this node first" in failed.value.error["msg"]
    # The runtime cleans up a failed ADD with DEL; it succeeds with nothing of authd there.
    cni.results["pod1"] = {"cniVersion": "1.0.0", "interfaces": [], "ips": []}
    cni.delete("pod1", pod_netns)


def test_a_pod_made_while_authd_is_stopped_is_enforced_from_its_first_packet(
    topology: Topology, authd: Authd, pin_dir: Path, pod_netns: Path, tmp_path: Path
) -> None:
    authd.start()
    authd.stop()  # the pins stay, the daemon is gone
    cni = runtime(topology, tmp_path, pin_dir, "ptp")
    server = EchoServer(topology)
    try:
        result = cni.add("pod1", pod_netns)
        veth, address = host_veth(result), pod_address(result)
        index = topology.ifindex(veth)
        with PinnedMaps(pin_dir) as maps:
            assert maps.endpoints.get(f"{address}/32") == EndpointOwner(index, ENDPOINT_F_CNI)
            maps.ipcache.update_many(
                {ip_network(f"{address}/32"): IpcacheEntry(P, 0), ip_network(f"{B4}/32"): IpcacheEntry(B, 0)}
            )
            # Only the program on the pod's own interface judges the pod's egress.
            maps.policy.update_many({PolicyKey(P, B, Direction.EGRESS): AuthType.SPIRE})
            before = maps.counters.read()["denied_auth_required"]
            assert not pod_connects_to(pod_netns, B4)  # the first packet, a SYN, is dropped
            assert maps.counters.read()["denied_auth_required"] > before
            maps.auth.update_many({AuthKey(P, B, 0): datetime.now(UTC) + timedelta(minutes=1)})
            assert pod_connects_to(pod_netns, B4)
            links = link_ids(topology, index)
            # authd comes back, matching the pod's veth too: it attaches idempotently, no second link.
            text = authd.config.read_text()
            authd.config.write_text(
                text.replace(
                    f'interfaces = ["adp{topology.tag}*"]', f'interfaces = ["adp{topology.tag}*", "veth*"]'
                )
            )
            authd.start()
            assert link_ids(topology, index) == links
            maps.auth.delete_many([AuthKey(P, B, 0)])
            assert not pod_connects_to(pod_netns, B4)
        cni.delete("pod1", pod_netns)
    finally:
        server.close()
    # It runs on every pod creation: interpreter start, imports, pins, two links, the map (measured 0.2 s).
    assert max(cni.timings["authd-cni ADD"]) < 1.0, cni.timings
