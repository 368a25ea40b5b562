"""The configuration tree: every key authd reads, with its default, description and check.

``config/authd.example.toml`` is rendered from these declarations (a test keeps it in step), so a key
added here is documented by adding it here.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Literal

from authd.config.schema import IpNetwork, section, setting
from authd.identity import SpiffeId

LogLevel = Literal["debug", "info", "warning", "error"]

_NODE_NAME = re.compile(r"[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?")


def absolute_path(value: Path) -> str | None:
    """Require an absolute filesystem path."""
    return None if value.is_absolute() else "must be an absolute path"


def positive_duration(value: timedelta) -> str | None:
    """Require a duration above zero."""
    return None if value > timedelta(0) else "must be longer than zero"


def node_name(value: str) -> str | None:
    """Require a name usable as a DNS name: lowercase letters, digits, dots and dashes."""
    if _NODE_NAME.fullmatch(value):
        return None
    return "must be 1-253 lowercase letters, digits, '.' or '-', starting and ending alphanumeric"


def ip_address(value: str) -> str | None:
    """Require an IPv4 or IPv6 address."""
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return "must be an IPv4 or IPv6 address"
    return None


def optional_ip_address(value: str) -> str | None:
    """Require an IPv4 or IPv6 address, or nothing."""
    return ip_address(value) if value else None


def port_number(value: int) -> str | None:
    """Require a TCP port."""
    return None if 1 <= value <= 65535 else "must be a port number in 1..65535"


def at_least_one(value: float) -> str | None:
    """Require a count or rate of at least one."""
    return None if value >= 1 else "must be at least 1"


@dataclass(frozen=True, slots=True)
class NodeConfig:
    """Who this node is and where it keeps its files."""

    name: str | None = setting(
        None, "this node's name in cluster state (default: the host name)", check=node_name, example="node-a"
    )
    spiffe_id: SpiffeId | None = setting(
        None,
        "the node ID: authd's own SVID is the Workload API SVID with exactly this ID, and authd refuses to "
        "start without one (default: spiffe://<the agent's trust domain>/authd/<name>); must match the "
        "node's spiffe_id in cluster state",
        check=lambda value: "must have a path, not be a bare trust domain" if value.is_root else None,
        example="spiffe://example.org/authd/node-a",
    )
    state_dir: Path = setting(
        Path("/var/lib/authd"), "state that must survive restarts (identity handles)", check=absolute_path
    )
    runtime_dir: Path = setting(Path("/run/authd"), "runtime files: the control socket", check=absolute_path)


@dataclass(frozen=True, slots=True)
class LogConfig:
    """Logging."""

    level: LogLevel = setting("info", "least severe level logged: debug, info, warning or error")
    format: Literal["auto", "json", "console"] = setting(
        "auto", "auto: JSON lines unless stdout is a terminal (journald), else a readable console"
    )


@dataclass(frozen=True, slots=True)
class DaemonConfig:
    """Daemon lifecycle."""

    shutdown_timeout: timedelta = setting(
        timedelta(seconds=10),
        "how long SIGTERM waits for jobs to stop before exiting with failure",
        check=positive_duration,
    )
    restart_backoff_initial: timedelta = setting(
        timedelta(milliseconds=200),
        "first delay before a failed non-critical job is restarted",
        check=positive_duration,
    )
    restart_backoff_max: timedelta = setting(
        timedelta(seconds=30),
        "longest delay between restarts of a failing non-critical job",
        check=positive_duration,
    )


def _entries(value: int) -> str | None:
    if 1 <= value <= 1 << 24:
        return None
    return f"must be between 1 and {1 << 24}"


def _ring_bytes(value: int) -> str | None:
    """Require a power of two from one page to 1 GiB (the kernel's ring-buffer rule)."""
    if 4096 <= value <= 1 << 30 and value & (value - 1) == 0:
        return None
    return "must be a power of two between 4096 and 1073741824"


def _interface_patterns(value: tuple[str, ...]) -> str | None:
    for pattern in value:
        if not pattern or len(pattern) > 64 or any(c in pattern for c in "/ \t\n:"):
            return "must be glob patterns of interface names (no '/', ':' or whitespace)"
    return None


def _rate_interval(value: timedelta) -> str | None:
    return None if timedelta(milliseconds=1) <= value <= timedelta(hours=1) else "must be between 1ms and 1h"


@dataclass(frozen=True, slots=True)
class DatapathConfig:
    """The BPF datapath: pinned maps, tc programs on interfaces, events."""

    enabled: bool = setting(
        True,  # noqa: FBT003 - the field's default
        "load the BPF programs and maps and enforce (false: control plane only)",
    )
    pin_dir: Path = setting(
        Path("/sys/fs/bpf/authd"),
        "bpffs directory the maps are pinned in (bpffs is mounted if missing)",
        check=absolute_path,
    )
    interfaces: tuple[str, ...] = setting(
        (),
        "glob patterns of interfaces to attach to, now and when they appear (workload-facing veths)",
        check=_interface_patterns,
        example=["lxc*", "veth*"],
    )
    attach_mode: Literal["auto", "tcx", "tc"] = setting(
        "auto",
        "how programs are attached: auto (tcx links placed first where the kernel has tcx, else tc), tcx, tc",
    )
    reassert_first: bool = setting(
        True,  # noqa: FBT003 - the field's default
        "when another tcx program gets ahead of authd's, put authd's first again (false: only report it)",
    )
    order_check_interval: timedelta = setting(
        timedelta(seconds=5),
        "how often attached interfaces are checked for programs running ahead of authd's",
        check=positive_duration,
    )
    flow_events: Literal["none", "denied", "first", "all"] = setting(
        "first", "flow events: none, denied, first (first packet of a connection and verdict changes) or all"
    )
    auth_required_interval: timedelta = setting(
        timedelta(seconds=1),
        "at most one auth-required event per pair and node per interval",
        check=_rate_interval,
    )
    auth_map_entries: int = setting(524288, "auth map size (pairs x remote nodes)", check=_entries)
    ipcache_entries: int = setting(65536, "ipcache size (address prefixes)", check=_entries)
    policy_entries: int = setting(16384, "policy map size (identity pairs and wildcards)", check=_entries)
    flow_table_entries: int = setting(
        65536, "connections remembered for first-packet flow events", check=_entries
    )
    events_ring_bytes: int = setting(
        4 * 1024 * 1024, "ring buffer for events, bytes (a power of two)", check=_ring_bytes
    )


@dataclass(frozen=True, slots=True)
class AttestConfig:
    """The node channel: one mutually authenticated TLS 1.3 connection per pair of nodes sharing policy."""

    listen_address: str = setting(
        "",
        "address the channel listener binds; empty: this node's first address in cluster state, which "
        "pods cannot reach (unlike 0.0.0.0)",
        check=optional_ip_address,
    )
    port: int = setting(
        4250,
        "TCP port of the channel listener (and of peers, unless a node overrides it)",
        check=port_number,
    )
    allow_sources: tuple[IpNetwork, ...] = setting(
        (),
        "networks admitted to the handshake besides the addresses of nodes in cluster state",
        example=["192.0.2.0/24"],
    )
    handshake_timeout: timedelta = setting(
        timedelta(seconds=2),
        "deadline from accept (or connect) to the peer's hello; slow or idle peers are cut",
        check=positive_duration,
    )
    max_concurrent_handshakes: int = setting(
        64, "handshakes served at once; connections beyond are closed at once", check=at_least_one
    )
    per_source_rate: float = setting(
        20.0, "handshakes per second one node address (an IPv6 /64) may start", check=at_least_one
    )
    per_source_burst: int = setting(
        40, "handshakes one source may start at once before the rate applies", check=at_least_one
    )
    global_rate: float = setting(
        200.0, "handshakes per second the listener starts, all sources together", check=at_least_one
    )
    client_timeout: timedelta = setting(
        timedelta(seconds=3),
        "deadline of one connection attempt to one peer address, TLS included",
        check=positive_duration,
    )
    retry_initial: timedelta = setting(
        timedelta(milliseconds=500),
        "first delay before a lost or failed channel is dialed again",
        check=positive_duration,
    )
    retry_max: timedelta = setting(
        timedelta(seconds=30),
        "longest delay between two attempts to dial a channel",
        check=positive_duration,
    )


def removal_share(value: float) -> str | None:
    """Require a share of endpoints above 0 and at most 1."""
    return None if 0 < value <= 1 else "must be above 0 and at most 1"


def etcd_endpoint(value: str) -> str | None:
    """Require an etcd client URL: http:// or https://, a host and a port."""
    scheme, _, rest = value.partition("://")
    host, _, port = rest.rpartition(":")
    if scheme in ("http", "https") and host and port.isdigit() and 1 <= int(port) <= 65535:
        return None
    return 'must be a URL like "https://10.0.0.1:2379"'


def _etcd_endpoints(value: tuple[str, ...]) -> str | None:
    if not value:
        return "must list at least one endpoint"
    bad = [endpoint for endpoint in value if etcd_endpoint(endpoint)]
    return f"{bad[0]!r} {etcd_endpoint(bad[0])}" if bad else None


def _etcd_prefix(value: str) -> str | None:
    return None if value.startswith("/") and value.endswith("/") else 'must start and end with "/"'


@dataclass(frozen=True, slots=True)
class EtcdConfig:
    """The etcd cluster holding cluster state (``cluster.source = "etcd"``; docs/architecture.md)."""

    endpoints: tuple[str, ...] = setting(
        ("https://127.0.0.1:2379",),
        "client URLs of etcd members; authd moves to the next on failure",
        check=_etcd_endpoints,
    )
    prefix: str = setting("/authd/cluster/", "the key prefix cluster state lives under", check=_etcd_prefix)
    ca_file: Path | None = setting(
        None,
        "CA bundle that etcd's server certificates chain to (https endpoints)",
        check=absolute_path,
        example="/etc/authd/etcd-ca.pem",
    )
    cert_file: Path | None = setting(
        None,
        "client certificate (chain) for etcd's client-cert auth, e.g. the node SVID written by spiffe-helper",
        check=absolute_path,
        example="/run/authd/svid.pem",
    )
    key_file: Path | None = setting(
        None, "private key of cert_file", check=absolute_path, example="/run/authd/svid.key"
    )
    dial_timeout: timedelta = setting(
        timedelta(seconds=3), "how long connecting to one member may take", check=positive_duration
    )
    request_timeout: timedelta = setting(
        timedelta(seconds=5), "how long a snapshot read or a push may take", check=positive_duration
    )
    retry_initial: timedelta = setting(
        timedelta(milliseconds=200), "first delay before etcd is tried again", check=positive_duration
    )
    retry_max: timedelta = setting(
        timedelta(seconds=10), "longest delay between attempts to reach etcd", check=positive_duration
    )

    def cross_check(self) -> list[str]:
        """A client key goes with a client certificate."""
        if (self.cert_file is None) != (self.key_file is None):
            return ["cert_file, key_file: set both or neither"]
        return []


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    """Where cluster state (nodes, endpoints, policy) comes from."""

    source: Literal["file", "etcd"] = setting(
        "file", "file: the TOML file below, copied to every node; etcd: the [cluster.etcd] store"
    )
    file: Path = setting(
        Path("/etc/authd/cluster.toml"),
        "the cluster state file every node reads (see config/cluster.example.toml)",
        check=absolute_path,
    )
    poll_interval: timedelta = setting(
        timedelta(seconds=1),
        "how often the cluster state file is checked for changes",
        check=positive_duration,
    )
    settle_time: timedelta = setting(
        timedelta(seconds=2),
        "a file rewritten in place is read once unmodified this long (an atomic rename is read at once)",
        check=positive_duration,
    )
    max_endpoint_removal: float = setting(
        1.0,
        "hold back a state removing more than this share of endpoints until `authd cluster accept` "
        "(1.0: only all)",
        check=removal_share,
    )
    etcd: EtcdConfig = section(EtcdConfig, "the etcd source")


@dataclass(frozen=True, slots=True)
class SpireConfig:
    """Where the local SPIRE agent and server are reached."""

    enabled: bool = setting(
        default=True,
        doc="fetch identities from SPIRE; false runs without any (tests of the bare daemon only)",
    )
    workload_socket: Path | None = setting(
        None,
        "SPIRE agent's Workload API socket, authd's own SVID (default: $SPIFFE_ENDPOINT_SOCKET; "
        "neither set: SPIRE is not used)",
        check=absolute_path,
        example="/run/spire/agent/public/api.sock",
    )
    admin_socket: Path = setting(
        Path("/run/spire/agent/private/admin.sock"),
        "SPIRE agent's admin socket (Delegated Identity API); must not be in the Workload API socket's "
        "directory",
        check=absolute_path,
    )
    server_socket: Path = setting(
        Path("/run/spire/server/private/api.sock"),  # not /tmp: the unit has PrivateTmp=yes
        "SPIRE server's API socket (Entry API, used by `authd spire sync`)",
        check=absolute_path,
    )
    reconnect_backoff_initial: timedelta = setting(
        timedelta(milliseconds=200),
        "first delay before a lost SPIRE stream is reopened",
        check=positive_duration,
    )
    reconnect_backoff_max: timedelta = setting(
        timedelta(seconds=30),
        "longest delay between attempts to reopen a SPIRE stream",
        check=positive_duration,
    )
    bundle_stream_reopen: timedelta = setting(
        timedelta(minutes=5),
        "reopen the bundle stream this often: SPIRE never drops a trust domain from an open stream, so a "
        "removed federated trust domain stays trusted until the stream is reopened",
        check=positive_duration,
    )
    sync_interval: timedelta = setting(
        timedelta(0),
        "run `authd spire sync` from the daemon this often, on the node that reaches the server (0: never)",
    )

    def cross_check(self) -> list[str]:
        """SPIRE's agent refuses an admin socket inside the Workload API socket's directory; so do we."""
        if self.workload_socket is not None and self.admin_socket.is_relative_to(self.workload_socket.parent):
            directory = str(self.workload_socket.parent)
            return [
                (
                    f"admin_socket: must not be inside the Workload API socket's directory {directory!r} "
                    f"(SPIRE refuses that too), got {str(self.admin_socket)!r}"
                )
            ]
        return []


@dataclass(frozen=True, slots=True)
class HttpConfig:
    """The HTTP endpoints: /metrics (Prometheus), /healthz and /readyz."""

    enabled: bool = setting(default=True, doc="serve the HTTP endpoints")
    listen_address: str = setting(
        "127.0.0.1",
        "address to serve on; the endpoints have no authentication, so loopback unless a scraper needs more",
        check=ip_address,
    )
    port: int = setting(9464, "TCP port", check=port_number)


def _file_name(value: str) -> str | None:
    return None if value and "/" not in value and value not in (".", "..") else "must be a plain file name"


def _optional_port(value: int | None) -> str | None:
    return None if value is None else port_number(value)


HISTORY_MIN_BYTES = 64 * 1024  # the smallest flow history: a few hundred flows in each of its two segments


def _history_bytes(value: int) -> str | None:
    if value == 0 or value >= HISTORY_MIN_BYTES:
        return None
    return f"must be 0 (no history) or at least {HISTORY_MIN_BYTES}"


@dataclass(frozen=True, slots=True)
class HubbleConfig:
    """Hubble's Observer API (gRPC): ``authd observe``, the Hubble CLI and Hubble Relay read flows here."""

    enabled: bool = setting(default=True, doc="serve observer.Observer on a Unix socket in node.runtime_dir")
    socket_name: str = setting("hubble.sock", "the socket's file name in node.runtime_dir", check=_file_name)
    tcp_port: int | None = setting(
        None,
        "also serve on 127.0.0.1:<port> (Hubble's own is 4245); no authentication, so loopback only",
        check=_optional_port,
        example=4245,
    )
    history_bytes: int = setting(
        8 * 1024 * 1024,
        "recent flows kept on disk in node.state_dir/flows across restarts, bytes (0: none)",
        check=_history_bytes,
    )


_INTERFACE_NAME = re.compile(r"[A-Za-z0-9_.-]{1,15}")


def interface_name(value: str) -> str | None:
    """Require a Linux interface name: 1-15 letters, digits, '_', '.' or '-' (IFNAMSIZ less the NUL)."""
    if _INTERFACE_NAME.fullmatch(value) and value not in (".", ".."):
        return None
    return "must be 1-15 letters, digits, '_', '.' or '-'"


def _rotation_interval(value: timedelta) -> str | None:
    if value == timedelta(0) or value >= timedelta(minutes=1):
        return None
    return "must be at least 1m, or 0s for no scheduled rotation"


@dataclass(frozen=True, slots=True)
class EncryptionConfig:
    """WireGuard between nodes, keyed over the node channel (docs/architecture.md, "Encryption")."""

    mode: Literal["off", "wireguard"] = setting(
        "off",
        "off, or wireguard: workload traffic between nodes through one WireGuard interface, its keys "
        "exchanged over the node channels (needs SPIRE: a channel to every node in cluster state)",
    )
    backend: Literal["auto", "kernel", "userspace"] = setting(
        "auto",
        "auto (kernel WireGuard where the kernel can create a wireguard link, else wireguard-go), kernel, "
        "userspace",
    )
    interface: str = setting(
        "authd-wg0", "name of the WireGuard interface authd manages", check=interface_name
    )
    listen_port: int = setting(
        51820, "UDP port WireGuard listens on (and peers are sent to)", check=port_number
    )
    rotation_interval: timedelta = setting(
        timedelta(hours=1),
        "how often the node key and the preshared keys rotate (0s: only on SVID rotation and on demand)",
        check=_rotation_interval,
    )
    wireguard_go: Path = setting(
        Path("/usr/bin/wireguard-go"), "the wireguard-go binary of the userspace backend", check=absolute_path
    )


@dataclass(frozen=True, slots=True)
class Config:
    """The whole authd configuration."""

    node: NodeConfig = section(NodeConfig, "this node")
    log: LogConfig = section(LogConfig, "logging")
    daemon: DaemonConfig = section(DaemonConfig, "daemon lifecycle")
    attest: AttestConfig = section(AttestConfig, "the node channels: attestation between nodes")
    cluster: ClusterConfig = section(ClusterConfig, "cluster state")
    datapath: DatapathConfig = section(DatapathConfig, "the BPF datapath")
    spire: SpireConfig = section(SpireConfig, "SPIRE agent and server")
    http: HttpConfig = section(HttpConfig, "metrics and health over HTTP")
    hubble: HubbleConfig = section(HubbleConfig, "Hubble's Observer API")
    encryption: EncryptionConfig = section(EncryptionConfig, "encryption between nodes")
