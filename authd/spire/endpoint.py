"""Where a SPIRE API listens, and the gRPC channel that reaches it.

The Workload API address comes from config or from ``SPIFFE_ENDPOINT_SOCKET`` (SPIFFE Workload Endpoint
section 4): ``unix:///abs/path`` (also ``unix:/abs/path``), ``tcp://<IP>:<port>``, or, as a convenience,
a plain absolute path. Admin and server sockets are always Unix socket paths.

Every connection attempt gets a fresh channel with its own connection: gRPC's own reconnect backoff (up
to two minutes) would otherwise keep failing calls long after the agent is back, and the one backoff that
decides when to retry is :mod:`authd.backoff`, driven by :mod:`authd.spire.stream`. The price is one Unix
socket connection per open stream (one per distinct selector set of the node's workloads).
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import grpc

from authd.errors import ConfigError, SpireError

ENDPOINT_ENV = "SPIFFE_ENDPOINT_SOCKET"

# Large bundles (many federated trust domains) exceed gRPC's 4 MiB default (Cilium hit this, #24297).
MAX_MESSAGE_BYTES = 32 * 1024 * 1024

_CHANNEL_OPTIONS = (
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    # Unix sockets need no name resolution or proxies; keep gRPC from looking for either.
    ("grpc.enable_http_proxy", 0),
    # By default gRPC shares one connection among all channels to the same target, with its own
    # reconnect backoff. A channel of its own per stream attempt keeps streams independent and leaves
    # the retry timing to authd's backoff.
    ("grpc.use_local_subchannel_pool", 1),
)


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A gRPC target, and the socket file behind it when it is a Unix socket."""

    target: str
    socket: Path | None

    @classmethod
    def unix(cls, path: Path) -> Endpoint:
        """A Unix socket at an absolute path."""
        if not path.is_absolute():
            raise ConfigError([f"spire: socket path must be absolute, got {str(path)!r}"])
        return cls(f"unix://{path}", path)

    def check_reachable(self) -> None:
        """Raise a retryable SpireError when the socket file does not exist (yet): the agent starts later."""
        if self.socket is not None and not self.socket.exists():
            raise SpireError(f"spire: socket {str(self.socket)!r} does not exist", retryable=True)

    def channel(self) -> grpc.aio.Channel:
        """Open a new insecure channel (Unix sockets are authenticated by the kernel, not by TLS)."""
        return grpc.aio.insecure_channel(self.target, options=_CHANNEL_OPTIONS)

    def __str__(self) -> str:
        """The socket path, or the gRPC target for TCP."""
        return str(self.socket) if self.socket is not None else self.target


def parse_endpoint(text: str) -> Endpoint:
    """Parse a Workload API address as ``SPIFFE_ENDPOINT_SOCKET`` spells it; raise ConfigError."""
    if text.startswith("/"):
        return Endpoint.unix(Path(text))
    parts = urlsplit(text)
    problem = f"{ENDPOINT_ENV}: want unix:///absolute/path or tcp://<IP>:<port>, got {text!r}"
    if parts.query or parts.fragment:
        raise ConfigError([f"{problem} (no query or fragment allowed)"])
    if parts.scheme == "unix":
        if parts.netloc:
            raise ConfigError([f"{problem} (a unix address has no authority)"])
        if not parts.path.startswith("/"):
            raise ConfigError([problem])
        return Endpoint.unix(Path(parts.path))
    if parts.scheme == "tcp":
        try:
            host = ipaddress.ip_address(parts.hostname or "")
            port = parts.port
        except ValueError as err:
            raise ConfigError([f"{problem} (the host must be an IP address)"]) from err
        if port is None or parts.path not in ("", "/") or parts.username is not None:
            raise ConfigError([problem])
        if host.version == 6:
            return Endpoint(f"ipv6:[{host}]:{port}", None)
        return Endpoint(f"ipv4:{host}:{port}", None)
    raise ConfigError([problem])


def workload_endpoint(configured: Path | None, environ: Mapping[str, str] | None = None) -> Endpoint | None:
    """The Workload API endpoint from config, else from ``SPIFFE_ENDPOINT_SOCKET``; None if neither is set."""
    if configured is not None:
        return Endpoint.unix(configured)
    value = (os.environ if environ is None else environ).get(ENDPOINT_ENV, "")
    return parse_endpoint(value) if value else None


def check_admin_socket(workload: Endpoint, admin: Path) -> None:
    """Refuse an admin socket inside the Workload API socket's directory, as SPIRE's agent does.

    Workloads can reach everything in that directory; the Delegated Identity API hands out other
    workloads' private keys, so it must live where only its delegates can connect.
    """
    if workload.socket is not None and admin.is_relative_to(workload.socket.parent):
        directory = str(workload.socket.parent)
        problem = f"must not be inside the Workload API socket's directory {directory!r}, got {str(admin)!r}"
        raise ConfigError([f"spire.admin_socket: {problem}"])
