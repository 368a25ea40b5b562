"""A container runtime's side of CNI: a chained conflist run plugin by plugin, prevResult threaded.

As libcni does: ADD runs the plugins in order, each given the network's ``name`` and ``cniVersion`` and
the previous plugin's result as ``prevResult``; the last result is the pod's (cached for DEL and CHECK).
CHECK runs them in order with that result, DEL in reverse order with it. Each plugin is found in
``CNI_PATH`` by its ``type`` and executed with CNI_COMMAND, CNI_CONTAINERID, CNI_NETNS, CNI_IFNAME,
CNI_PATH and the config on stdin, inside the node's network namespace (where runtimes run them).
The devcluster builds pods this way with ``ClusterSpec(cni=True)``; the privileged tests drive it
directly.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from authd.devcluster.netns import HarnessError

REFERENCE_PLUGINS = Path("/usr/lib/cni")


class PluginError(HarnessError):
    """A plugin exited non-zero; ``error`` is the CNI error object it printed."""

    def __init__(self, plugin: str, error: dict[str, Any]) -> None:
        """Hold which plugin failed and its error object."""
        super().__init__(f"harness: CNI plugin {plugin} failed: {error}")
        self.plugin = plugin
        self.error = error


def bin_dir(tmp: Path) -> Path:
    """A CNI_PATH directory in ``tmp`` with ``authd-cni`` (the console script, linked as install.md says)."""
    path = tmp / "cni-bin"
    path.mkdir(exist_ok=True)
    link = path / "authd-cni"
    if not link.exists():
        link.symlink_to(Path(sys.executable).parent / "authd-cni")
    return path


@dataclass
class Runtime:
    """Runs one conflist for pods of one node namespace."""

    node_netns: Path
    conflist: dict[str, Any]
    cni_path: list[Path]
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    timings: dict[str, list[float]] = field(default_factory=dict)

    def run_plugin(self, plugin: dict[str, Any], command: str, pod: str, netns: Path, prev: Any) -> Any:  # noqa: ANN401 - JSON
        """Run one plugin of the list; return what it printed (None for nothing)."""
        config = {"cniVersion": self.conflist["cniVersion"], "name": self.conflist["name"], **plugin}
        if prev is not None:
            config["prevResult"] = prev
        env = {
            "CNI_COMMAND": command,
            "CNI_CONTAINERID": pod,
            "CNI_NETNS": str(netns),
            "CNI_IFNAME": "eth0",
            "CNI_PATH": ":".join(str(p) for p in self.cni_path),
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        }
        binary = next(p / plugin["type"] for p in self.cni_path if (p / plugin["type"]).exists())
        started = time.monotonic()
        done = subprocess.run(
            ["nsenter", f"--net={self.node_netns}", str(binary)],
            input=json.dumps(config),
            env=env,
            capture_output=True,
            text=True,
            check=False,
            timeout=30,
        )
        self.timings.setdefault(f"{plugin['type']} {command}", []).append(time.monotonic() - started)
        if done.returncode != 0:
            try:
                error = json.loads(done.stdout)
            except ValueError:
                error = {"code": None, "msg": done.stdout + done.stderr}
            raise PluginError(plugin["type"], error)
        return json.loads(done.stdout) if done.stdout.strip() else None

    def add(self, pod: str, netns: Path) -> dict[str, Any]:
        """ADD through the whole list; return (and keep) the pod's result."""
        prev = None
        for plugin in self.conflist["plugins"]:
            prev = self.run_plugin(plugin, "ADD", pod, netns, prev)
        if not isinstance(prev, dict):
            raise HarnessError(f"harness: the last CNI plugin printed no result for {pod}")
        self.results[pod] = prev
        return prev

    def check(self, pod: str, netns: Path) -> None:
        """CHECK through the whole list with the pod's result."""
        for plugin in self.conflist["plugins"]:
            self.run_plugin(plugin, "CHECK", pod, netns, self.results[pod])

    def delete(self, pod: str, netns: Path) -> None:
        """DEL through the list in reverse order with the pod's result, when there is one."""
        for plugin in reversed(self.conflist["plugins"]):
            self.run_plugin(plugin, "DEL", pod, netns, self.results.get(pod))
        self.results.pop(pod, None)


def conflist(
    kind: str,
    *,
    subnet: str,
    data_dir: Path,
    pin_dir: Path,
    bridge: str = "",
    address: str = "",
    subnet6: str = "",
    address6: str = "",
) -> dict[str, Any]:
    """``ptp`` or ``bridge`` with ``host-local`` IPAM, then ``authd-cni``.

    One range per family: ``subnet`` (IPv4), and with ``subnet6`` an IPv6 one too (dual stack, as a
    runtime configures it). ``address`` and ``address6`` narrow a range to exactly that address.
    """
    ranges: list[list[dict[str, str]]] = []
    routes: list[dict[str, str]] = []
    for net, only, default in ((subnet, address, "0.0.0.0/0"), (subnet6, address6, "::/0")):
        if not net:
            continue
        pool = {"subnet": net}
        if only:
            pool.update(rangeStart=only, rangeEnd=only)
        ranges.append([pool])
        routes.append({"dst": default})
    ipam = {"type": "host-local", "dataDir": str(data_dir), "ranges": ranges, "routes": routes}
    first: dict[str, Any] = {"type": kind, "ipam": ipam}
    if kind == "bridge":
        first.update(bridge=bridge, isGateway=True)
    return {
        "cniVersion": "1.0.0",
        "name": f"authd-{kind}",
        "plugins": [first, {"type": "authd-cni", "pinDir": str(pin_dir)}],
    }
