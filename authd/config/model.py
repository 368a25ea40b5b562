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

from authd.config.schema import section, setting

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


def port_number(value: int) -> str | None:
    """Require a TCP port."""
    return None if 1 <= value <= 65535 else "must be a port number in 1..65535"


def at_least_one(value: float) -> str | None:
    """Require a count or rate of at least one."""
    return None if value >= 1 else "must be at least 1"


def open_fraction(value: float) -> str | None:
    """Require a fraction strictly between 0 and 1."""
    return None if 0 < value < 1 else "must be between 0 and 1 (exclusive)"


@dataclass(frozen=True, slots=True)
class NodeConfig:
    """Who this node is and where it keeps its files."""

    name: str | None = setting(
        None, "this node's name in cluster state (default: the host name)", check=node_name, example="node-a"
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
    """Attestation between nodes: the TLS 1.3 listener and the client that asks other nodes."""

    listen_address: str = setting("0.0.0.0", "address the attestation listener binds", check=ip_address)  # noqa: S104 - other nodes must reach it
    port: int = setting(
        4250,
        "TCP port of the attestation listener (and of peers, unless a node overrides it)",
        check=port_number,
    )
    handshake_timeout: timedelta = setting(
        timedelta(seconds=2),
        "deadline from accept to a verified client; slow or idle peers are cut",
        check=positive_duration,
    )
    max_concurrent_handshakes: int = setting(
        64, "handshakes served at once; connections beyond are closed at once", check=at_least_one
    )
    per_source_rate: float = setting(
        20.0,
        "connections per second one source address may open that end in no served attestation",
        check=at_least_one,
    )
    per_source_burst: int = setting(
        40, "such connections one source may open at once before the rate applies", check=at_least_one
    )
    client_timeout: timedelta = setting(
        timedelta(seconds=3),
        "deadline of one attestation attempt to one peer address",
        check=positive_duration,
    )
    client_concurrency: int = setting(16, "attestations this node runs at once", check=at_least_one)
    renew_after: float = setting(
        0.6,
        "fraction of a remote SVID's lifetime after which it is re-attested (SPIRE rotates at about half)",
        check=open_fraction,
    )
    retry_initial: timedelta = setting(
        timedelta(milliseconds=500),
        "first delay before a failed attestation is retried",
        check=positive_duration,
    )
    retry_max: timedelta = setting(
        timedelta(seconds=30),
        "longest delay between retries of a failing attestation",
        check=positive_duration,
    )


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    """Where cluster state (nodes, endpoints, policy) comes from."""

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
        Path("/tmp/spire-server/private/api.sock"),  # noqa: S108 - SPIRE server's own default path
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


@dataclass(frozen=True, slots=True)
class Config:
    """The whole authd configuration."""

    node: NodeConfig = section(NodeConfig, "this node")
    log: LogConfig = section(LogConfig, "logging")
    daemon: DaemonConfig = section(DaemonConfig, "daemon lifecycle")
    attest: AttestConfig = section(AttestConfig, "attestation between nodes")
    cluster: ClusterConfig = section(ClusterConfig, "cluster state")
    datapath: DatapathConfig = section(DatapathConfig, "the BPF datapath")
    spire: SpireConfig = section(SpireConfig, "SPIRE agent and server")
    http: HttpConfig = section(HttpConfig, "metrics and health over HTTP")
