"""``authd-cni``: a chained CNI plugin that puts a new pod under authd's enforcement from its first packet.

It follows the CNI spec (versions 0.3.0 to 1.0.0): the command in ``CNI_COMMAND``, the network config on
stdin, the result or an error object (with the spec's codes) on stdout. It runs after the plugin that
made the pod's interface (``ptp`` or ``bridge``), reads that plugin's ``prevResult`` and, using nothing
but the pins under ``pinDir`` (no object load, no daemon):

- ADD: finds the pod's host-side veth (an interface of prevResult without ``sandbox``: for ``bridge``
  the veth, not the bridge), attaches the pinned programs to it exactly as authd does (tcx first, or tc
  on kernels without tcx; idempotent, so authd's own link watcher attaching the same interface changes
  nothing), records each pod address of prevResult's ``ips``, of either family, in the endpoints map as
  owned by that interface (ENDPOINT_F_CNI), then prints prevResult unchanged. The pod's IPv6 link-local
  address is not recorded, as authd does not learn it from routes either: the programs pass neighbour
  and multicast listener discovery from it and refuse anything else. Without pins (authd never ran on
  this node) ADD fails with code 11, "try again later": the pod is not started unenforced.
- DEL: removes the pod's endpoints entries and its links, and the pins of every link whose interface is
  gone (a runtime usually deletes the pod's namespace, and with it the veth, before DEL); it succeeds
  when any of it is gone already.
- CHECK: fails unless both hooks run authd's pinned programs first and the entries are there.

It acts in the network namespace it is started in (the node's, as container runtimes do). Config keys
besides the spec's: ``pinDir`` (default ``/sys/fs/bpf/authd``, the daemon's ``datapath.pin_dir``) and
``attachMode`` (``auto``, ``tcx`` or ``tc``, as ``datapath.attach_mode``).
"""

from __future__ import annotations

import array
import fcntl
import json
import os
import socket
import struct
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from ipaddress import ip_interface
from pathlib import Path
from typing import Any, NoReturn

from authd.datapath.attach import Attacher, AttachMode
from authd.datapath.layout import MapName
from authd.datapath.maps import EndpointOwner, EndpointsMap, Network, open_map
from authd.errors import DatapathError

SUPPORTED_VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0")
ENDPOINT_F_CNI = 0x2  # AUTHD_ENDPOINT_F_CNI
DEFAULT_PIN_DIR = "/sys/fs/bpf/authd"

# Error codes of the CNI spec; 100 and up are the plugin's own.
INCOMPATIBLE_VERSION = 1
INVALID_ENVIRONMENT = 4
IO_FAILURE = 5
DECODE_FAILURE = 6
INVALID_CONFIG = 7
TRY_AGAIN_LATER = 11
NOT_ENFORCED = 100

_SIOCETHTOOL = 0x8946
_ETHTOOL_GDRVINFO = 0x00000003
_DRVINFO_SIZE = 196  # struct ethtool_drvinfo


class CniError(Exception):
    """An error for the runtime: a spec code, a message and details."""

    def __init__(self, code: int, msg: str, details: str = "") -> None:
        """Hold what the error object says."""
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.details = details


@dataclass(frozen=True, slots=True)
class Request:
    """One invocation: command, the config from stdin, and the pod's id."""

    command: str
    config: dict[str, Any]
    container_id: str

    @property
    def version(self) -> str:
        """The config's cniVersion."""
        return str(self.config.get("cniVersion", "1.0.0"))

    @property
    def pin_dir(self) -> Path:
        """Where authd's pins are."""
        return Path(str(self.config.get("pinDir", DEFAULT_PIN_DIR)))

    @property
    def mode(self) -> AttachMode:
        """How to attach."""
        try:
            return AttachMode(str(self.config.get("attachMode", "auto")))
        except ValueError as err:
            raise CniError(INVALID_CONFIG, "attachMode must be auto, tcx or tc") from err

    @property
    def prev_result(self) -> dict[str, Any] | None:
        """The previous plugin's result, or None."""
        prev = self.config.get("prevResult")
        return prev if isinstance(prev, dict) else None


def driver(name: str) -> str:
    """The kernel driver of an interface of this network namespace (``veth``, ``bridge``), by ethtool."""
    info = array.array("B", struct.pack("=I", _ETHTOOL_GDRVINFO) + bytes(_DRVINFO_SIZE - 4))
    address, _ = info.buffer_info()
    ifreq = struct.pack("16sP", name.encode()[:15], address)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        fcntl.ioctl(sock, _SIOCETHTOOL, ifreq)
    return info.tobytes()[4:36].split(b"\0", 1)[0].decode()


def host_veths(prev: Mapping[str, Any]) -> list[tuple[str, int]]:
    """The pod's host-side veths in prevResult: (name, ifindex) of interfaces without a sandbox."""
    found = []
    for entry in prev.get("interfaces") or []:
        if not isinstance(entry, dict) or entry.get("sandbox") or not isinstance(entry.get("name"), str):
            continue
        name = entry["name"]
        try:
            index = socket.if_nametoindex(name)
            kind = driver(name)
        except OSError:
            continue  # not here (DEL after the interface went) or not an interface ethtool knows
        if kind == "veth":
            found.append((name, index))
    return found


def pod_networks(prev: Mapping[str, Any]) -> list[Network]:
    """Each pod address as a host prefix (/32, /128)."""
    networks: list[Network] = []
    for entry in prev.get("ips") or []:
        try:
            address = ip_interface(str(entry["address"])).ip
        except (KeyError, TypeError, ValueError) as err:
            raise CniError(DECODE_FAILURE, "prevResult: an ips entry has no valid address") from err
        networks.append(ip_interface(f"{address}/{address.max_prefixlen}").network)
    return networks


def _endpoints(pin_dir: Path) -> EndpointsMap:
    return EndpointsMap(open_map(pin_dir, MapName.ENDPOINTS))


def add(request: Request) -> dict[str, Any]:
    """Attach to the pod's host-side veth and record its addresses; return prevResult."""
    prev = request.prev_result
    if prev is None:
        raise CniError(INVALID_CONFIG, "authd-cni is a chained plugin: it needs a prevResult")
    veths = host_veths(prev)
    if len(veths) != 1:
        raise CniError(
            INVALID_CONFIG,
            f"prevResult must name exactly one host-side veth, found {len(veths)}",
            "authd-cni chains after ptp or bridge",
        )
    (name, index), networks = veths[0], pod_networks(prev)
    try:
        with Attacher(request.pin_dir, mode=request.mode) as attacher:
            attacher.attach(index, l3=False)
    except DatapathError as err:
        if not (request.pin_dir / "progs").is_dir():
            raise CniError(
                TRY_AGAIN_LATER,
                f"authd's programs are not pinned at {request.pin_dir}: start authd on this node first",
                str(err),
            ) from err
        raise CniError(IO_FAILURE, f"cannot attach authd's programs to {name}", str(err)) from err
    try:
        endpoints = _endpoints(request.pin_dir)
        try:
            entries = {}
            for network in networks:
                old = endpoints.get(network)
                flags = old.flags if old is not None and old.ifindex == index else 0
                entries[network] = EndpointOwner(index, flags | ENDPOINT_F_CNI)
            endpoints.update_many(entries)
        finally:
            endpoints.close()
    except DatapathError as err:
        raise CniError(IO_FAILURE, "cannot record the pod's endpoints", str(err)) from err
    return prev


def delete(request: Request) -> None:
    """Remove the pod's endpoints entries and links; what is gone already is fine."""
    prev = request.prev_result
    if prev is None or not (request.pin_dir / MapName.ENDPOINTS).exists():
        return  # nothing known about this pod, or nothing of authd left on this node
    veths = host_veths(prev)
    indexes = {index for _, index in veths}
    try:
        endpoints = _endpoints(request.pin_dir)
        try:
            gone = []
            for network in pod_networks(prev):
                old = endpoints.get(network)
                # Only the pod's own entry: with its veth gone, any entry the plugin recorded.
                if old is None or not (old.ifindex in indexes or (not veths and old.flags & ENDPOINT_F_CNI)):
                    continue
                if old.flags & ~ENDPOINT_F_CNI:  # authd learned it too: it keeps its part
                    endpoints.update_many({network: EndpointOwner(old.ifindex, old.flags & ~ENDPOINT_F_CNI)})
                else:
                    gone.append(network)
            endpoints.delete_many(gone)
        finally:
            endpoints.close()
        if (request.pin_dir / "progs").is_dir():
            with Attacher(request.pin_dir, mode=request.mode) as attacher:
                for _, index in veths:
                    attacher.detach(index)
                attacher.collect_defunct()  # the pod's links, when its veth went before DEL
    except DatapathError as err:
        raise CniError(IO_FAILURE, "cannot remove the pod's endpoints or links", str(err)) from err


def check(request: Request) -> None:
    """Fail unless authd's programs run first on the pod's veth and its addresses are recorded."""
    prev = request.prev_result
    if prev is None:
        raise CniError(INVALID_CONFIG, "CHECK needs a prevResult")
    veths = host_veths(prev)
    if len(veths) != 1:
        raise CniError(NOT_ENFORCED, f"the pod's host-side veth is missing (found {len(veths)})")
    name, index = veths[0]
    try:
        with Attacher(request.pin_dir, mode=request.mode) as attacher:
            problems = attacher.verify(index, l3=False)
        endpoints = _endpoints(request.pin_dir)
        try:
            for network in pod_networks(prev):
                owner = endpoints.get(network)
                if owner is None or owner.ifindex != index:
                    problems.append(f"{network} is not recorded as owned by {name}")
        finally:
            endpoints.close()
    except DatapathError as err:
        raise CniError(NOT_ENFORCED, f"cannot check {name}", str(err)) from err
    if problems:
        raise CniError(NOT_ENFORCED, f"{name} is not enforced by authd", "; ".join(problems))


def _env(name: str) -> str:
    value = os.environ.get(name, "")
    if not value:
        raise CniError(INVALID_ENVIRONMENT, f"{name} is not set")
    return value


def parse(stdin: str) -> Request:
    """The request from the environment and stdin."""
    command = _env("CNI_COMMAND")
    if command == "VERSION":
        return Request(command, {}, "")
    try:
        config = json.loads(stdin)
    except ValueError as err:
        raise CniError(DECODE_FAILURE, "the network config on stdin is not JSON") from err
    if not isinstance(config, dict):
        raise CniError(DECODE_FAILURE, "the network config on stdin is not a JSON object")
    request = Request(command, config, "")
    if request.version not in SUPPORTED_VERSIONS:
        raise CniError(INCOMPATIBLE_VERSION, f"cniVersion {request.version} is not supported")
    if command not in ("ADD", "DEL", "CHECK"):
        raise CniError(INVALID_ENVIRONMENT, f"CNI_COMMAND {command!r} is unknown")
    if command == "CHECK" and request.version.startswith("0.3"):
        raise CniError(INCOMPATIBLE_VERSION, "CHECK needs cniVersion 0.4.0 or later")
    for name in ("CNI_IFNAME", "CNI_PATH") if command == "DEL" else ("CNI_NETNS", "CNI_IFNAME", "CNI_PATH"):
        _env(name)
    return Request(command, config, _env("CNI_CONTAINERID"))


def run(stdin: str) -> tuple[int, dict[str, Any] | None]:
    """Serve one invocation: the exit status and what to print."""
    version = "1.0.0"
    try:
        request = parse(stdin)
        version = request.version
        if request.command == "VERSION":
            return 0, {"cniVersion": "1.0.0", "supportedVersions": list(SUPPORTED_VERSIONS)}
        if request.command == "ADD":
            return 0, add(request)
        if request.command == "DEL":
            delete(request)
        else:
            check(request)
    except CniError as err:
        return 1, {"cniVersion": version, "code": err.code, "msg": err.msg, "details": err.details}
    return 0, None


def main() -> NoReturn:
    """The console script. stdout carries the result alone: anything else printed goes to stderr."""
    result = os.fdopen(os.dup(1), "w")
    sys.stdout.flush()
    os.dup2(2, 1)
    status, output = run(sys.stdin.read())
    if output is not None:
        result.write(json.dumps(output) + "\n")
    result.close()
    sys.exit(status)
