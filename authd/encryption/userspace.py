"""The userspace backend: wireguard-go on a TUN interface, configured over its UAPI socket.

wireguard-go puts its socket in ``/run/wireguard``, one directory for every network namespace, so two
nodes on one machine would collide. Where that directory is a mount of its own, it is taken as this
authd's private one, and wireguard-go runs directly: that is the unit's ``TemporaryFileSystem=``, since
the unit allows neither new namespaces nor mounts. Anywhere else (authd run by hand, several nodes on one
machine), wireguard-go runs in a mount namespace of its own with a private tmpfs on that directory. authd
reaches the socket through ``/proc/<pid>/root/run/wireguard`` either way.

wireguard-go runs in a session of its own, and its pid is kept in ``<runtime_dir>/wireguard-go.<if>.pid``:
when authd is killed the tunnel keeps forwarding, and the restarted authd adopts the same process (same
interface, same keys, same sessions) instead of starting a new one.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

import structlog
from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from authd.encryption.device import DeviceStatus, PeerSpec
from authd.encryption.keys import KeyPair, PublicKey
from authd.encryption.uapi import UapiClient, set_request
from authd.errors import EncryptionError

log = structlog.get_logger(__name__)

START_TIMEOUT = 5.0
_POLL = 0.01
# $0 is the binary and $1 the interface (checked by the config); nothing is interpolated into the script.
_SCRIPT = 'mkdir -p /run/wireguard && mount -t tmpfs authd-wg /run/wireguard && exec "$0" -f "$1"'
_SOCKET_DIR = Path("/run/wireguard")


class WireGuardGo:
    """One wireguard-go process and its interface."""

    name: Literal["userspace"] = "userspace"

    def __init__(
        self, interface: str, pid: int, pid_file: Path, process: subprocess.Popen[bytes] | None
    ) -> None:
        """Wrap a running wireguard-go (``process`` when this authd started it, None when adopted)."""
        self.interface = interface
        self.pid = pid
        self._pid_file = pid_file
        self._process = process
        self._uapi = UapiClient(_socket_path(pid, interface))

    @classmethod
    def open(cls, interface: str, *, binary: Path, runtime_dir: Path) -> WireGuardGo:
        """Adopt the wireguard-go an earlier authd left running for ``interface``, or start one."""
        pid_file = runtime_dir / f"wireguard-go.{interface}.pid"
        adopted = _adoptable(pid_file, interface)
        if adopted is not None:
            log.info("wireguard-go adopted", interface=interface, pid=adopted)
            return cls(interface, adopted, pid_file, None)
        _delete_link(interface)  # a stale interface of a wireguard-go that is gone
        try:
            process = subprocess.Popen(  # noqa: S603 - fixed argv; binary and interface checked by the config
                _argv(binary, interface, private=_SOCKET_DIR.is_mount()),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LOG_LEVEL": "error"},
                start_new_session=True,
            )
        except OSError as err:
            raise EncryptionError(f"encryption: cannot start {binary}: {err}") from err
        backend = cls(interface, process.pid, pid_file, process)
        try:
            backend._wait_ready()
            _set_up(interface)
            runtime_dir.mkdir(parents=True, exist_ok=True)
            pid_file.write_text(f"{process.pid}\n")
        except EncryptionError:
            backend.close(remove=True)
            raise
        log.info("wireguard-go started", interface=interface, pid=process.pid)
        return backend

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self._process is not None and self._process.poll() is not None:
                error = self._process.stderr.read().decode(errors="replace") if self._process.stderr else ""
                raise EncryptionError(f"encryption: wireguard-go exited at start: {error.strip()[:200]}")
            if self._uapi.path.exists():
                return
            time.sleep(_POLL)
        raise EncryptionError(f"encryption: wireguard-go's socket did not appear within {START_TIMEOUT}s")

    @property
    def ifindex(self) -> int:
        """The TUN interface's index."""
        try:
            return socket.if_nametoindex(self.interface)
        except OSError as err:
            raise EncryptionError(f"encryption: interface {self.interface} is gone") from err

    def configure(
        self,
        *,
        private_key: KeyPair | None = None,
        listen_port: int | None = None,
        peers: Iterable[PeerSpec] = (),
        remove: Iterable[PublicKey] = (),
    ) -> None:
        """Apply everything in one UAPI set request."""
        self._uapi.set(
            set_request(private_key=private_key, listen_port=listen_port, peers=peers, remove=remove)
        )

    def status(self) -> DeviceStatus:
        """The device as wireguard-go reports it."""
        return self._uapi.get()

    def close(self, *, remove: bool) -> None:
        """Stop wireguard-go (its interface goes with it) when ``remove``; else leave it running."""
        if self._process is not None and self._process.stderr is not None:
            self._process.stderr.close()
        if not remove:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGTERM)
        if self._process is not None:
            try:
                self._process.wait(timeout=START_TIMEOUT)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        else:
            _wait_gone(self.pid)
        with contextlib.suppress(FileNotFoundError):
            self._pid_file.unlink()
        _delete_link(self.interface)


def _socket_path(pid: int, interface: str) -> Path:
    """wireguard-go ``pid``'s UAPI socket for ``interface``, seen through its root (mount namespace)."""
    return Path(f"/proc/{pid}/root") / _SOCKET_DIR.relative_to("/") / f"{interface}.sock"


def _argv(binary: Path, interface: str, *, private: bool) -> list[str]:
    """How to start wireguard-go for ``interface``; ``private``: ``/run/wireguard`` is this authd's own."""
    if private:
        return [str(binary), "-f", interface]
    return [
        "/usr/bin/unshare",
        "--mount",
        "--propagation",
        "private",
        "/bin/sh",
        "-c",
        _SCRIPT,
        str(binary),
        interface,
    ]


def _adoptable(pid_file: Path, interface: str) -> int | None:
    """The pid in ``pid_file`` if it is a live wireguard-go serving ``interface``'s socket."""
    try:
        pid = int(pid_file.read_text())
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    except (OSError, ValueError):
        return None
    if comm != "wireguard-go":
        return None
    try:
        UapiClient(_socket_path(pid, interface)).get()
    except EncryptionError:
        return None
    return pid


def _wait_gone(pid: int) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(_POLL)


def _set_up(interface: str) -> None:
    try:
        with IPRoute() as ipr:
            ipr.link("set", index=socket.if_nametoindex(interface), state="up")
    except (OSError, NetlinkError) as err:
        raise EncryptionError(f"encryption: cannot bring {interface} up: {err}") from err


def _delete_link(interface: str) -> None:
    with IPRoute() as ipr:
        indexes = ipr.link_lookup(ifname=interface)
        for index in indexes:
            with contextlib.suppress(NetlinkError):
                ipr.link("del", index=index)
