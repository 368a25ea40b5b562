"""Typed access to the pinned maps: the auth map, ipcache, policy, counters, verdicts and runtime config.

Keys and values are frozen dataclasses mirroring ``bpf/include/authd.h``; packing uses ``struct`` formats
that the layout test checks against the ctypes mirror (and that against the object's BTF). Bulk writes use
one BATCH syscall where the map type supports it.
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_network
from pathlib import Path
from typing import Self

from authd.datapath import clock, layout
from authd.datapath.layout import AuthType, Counter, Direction, Family, FlowLevel, MapName
from authd.datapath.syscalls import MapHandle, obj_get
from authd.errors import DatapathError

_U32_MAX = 0xFFFFFFFF

# struct formats, checked against layout.py's ctypes mirror by the layout test.
AUTH_KEY = struct.Struct("=IIIB3x")  # struct authd_auth_key
AUTH_VALUE = struct.Struct("=Q")  # struct authd_auth_value
POLICY_KEY = struct.Struct("=IIB3x")  # struct authd_policy_key
POLICY_VALUE = struct.Struct("=B3x")  # struct authd_policy_value
IPCACHE_KEY = struct.Struct("=II16s")  # struct authd_ipcache_key
IPCACHE_VALUE = struct.Struct("=III")  # struct authd_ipcache_value
CONFIG_VALUE = struct.Struct("=IIQ")  # struct authd_config
ENDPOINT_VALUE = struct.Struct("=II")  # struct authd_endpoint_value

Network = IPv4Network | IPv6Network
Address = IPv4Address | IPv6Address


def _u32(name: str, value: int) -> None:
    if not 0 <= value <= _U32_MAX:
        raise DatapathError(f"datapath: {name} {value} does not fit in 32 bits")


@dataclass(frozen=True, slots=True)
class AuthKey:
    """An auth map key: local identity, remote identity, the remote's node, and how it was authenticated."""

    local: int
    remote: int
    remote_node: int
    auth_type: AuthType = AuthType.SPIRE

    def __post_init__(self) -> None:
        """Refuse values the map cannot hold."""
        _u32("local identity", self.local)
        _u32("remote identity", self.remote)
        _u32("remote node", self.remote_node)

    def pack(self) -> bytes:
        """The key's bytes in the map."""
        return AUTH_KEY.pack(self.local, self.remote, self.remote_node, self.auth_type)

    @classmethod
    def unpack(cls, raw: bytes) -> AuthKey:
        """Read a key from the map's bytes."""
        local, remote, node, auth_type = AUTH_KEY.unpack_from(raw)
        return cls(local, remote, node, AuthType(auth_type))


@dataclass(frozen=True, slots=True)
class PolicyKey:
    """A policy map key; either identity may be :data:`~authd.datapath.layout.IDENTITY_ANY`."""

    local: int
    remote: int
    direction: Direction

    def __post_init__(self) -> None:
        """Refuse values the map cannot hold."""
        _u32("local identity", self.local)
        _u32("remote identity", self.remote)

    def pack(self) -> bytes:
        """The key's bytes in the map."""
        return POLICY_KEY.pack(self.local, self.remote, self.direction)

    @classmethod
    def unpack(cls, raw: bytes) -> PolicyKey:
        """Read a key from the map's bytes."""
        local, remote, direction = POLICY_KEY.unpack_from(raw)
        return cls(local, remote, Direction(direction))


@dataclass(frozen=True, slots=True)
class IpcacheEntry:
    """What the ipcache says about an address: its identity handle and the node it lives on."""

    identity: int
    node: int

    def __post_init__(self) -> None:
        """Refuse values the map cannot hold."""
        _u32("identity", self.identity)
        _u32("node", self.node)


def ipcache_key(network: Network) -> bytes:
    """The LPM key of a prefix: the family's 32 bits, then the address."""
    family = Family.IPV4 if network.version == 4 else Family.IPV6
    return IPCACHE_KEY.pack(
        layout.IPCACHE_FAMILY_BITS + network.prefixlen, family, network.network_address.packed
    )


def _network_of(raw: bytes) -> Network:
    prefixlen, family, addr = IPCACHE_KEY.unpack_from(raw)
    bits = prefixlen - layout.IPCACHE_FAMILY_BITS
    if family == Family.IPV4:
        return IPv4Network((IPv4Address(addr[:4]), bits))
    return IPv6Network((IPv6Address(addr), bits))


class _Map:
    def __init__(self, handle: MapHandle) -> None:
        self._map = handle

    @property
    def capacity(self) -> int:
        """The map's max_entries."""
        return self._map.info.max_entries

    def close(self) -> None:
        """Close the map's fd."""
        self._map.close()

    def _update_batch(self, pairs: list[tuple[bytes, bytes]], what: str) -> None:
        try:
            self._map.update_batch(pairs)
        except OSError as err:
            if err.errno == errno.E2BIG:
                raise DatapathError(
                    f"datapath: {what} map is full ({self.capacity} entries): raise its size in [datapath]"
                ) from err
            raise DatapathError(f"datapath: cannot update the {what} map: {err.strerror}") from err


class AuthMap(_Map):
    """The auth map: which (local, remote, remote node, auth type) are authenticated until when."""

    def items(self) -> list[tuple[AuthKey, datetime]]:
        """Every entry with its expiry as an aware UTC datetime, read from the map in batches."""
        offset = clock.tai_offset_ns()
        return [
            (AuthKey.unpack(k), clock.from_tai_ns(AUTH_VALUE.unpack_from(v)[0], offset))
            for k, v in self._map.items()
        ]

    def packed_items(self) -> dict[bytes, int]:
        """Every entry as its packed key and its raw expiry (the datapath's time base).

        For reads of the whole map: it makes no object per entry beyond the key's bytes and an int, which
        the garbage collector does not track (200k tracked objects alive at once set off full
        collections, each a stall of the whole process).
        """
        size = AUTH_KEY.size
        entries: dict[bytes, int] = {}
        for keys, values, count in self._map.blocks():
            expiries = memoryview(values).cast("Q")  # AUTH_VALUE: one native u64
            for i in range(count):
                entries[keys[i * size : (i + 1) * size]] = expiries[i]
        return entries

    def update_packed(self, entries: Mapping[bytes, datetime]) -> None:
        """Write many entries, keys already packed, in one syscall."""
        offset = clock.tai_offset_ns()
        self._update_batch(
            [(k, AUTH_VALUE.pack(clock.to_tai_ns(v, offset))) for k, v in entries.items()], "auth"
        )

    def delete_packed(self, keys: Iterable[bytes]) -> int:
        """Delete entries by packed key; missing ones are skipped. Return how many were deleted."""
        return self._map.delete_batch(list(keys))

    def get(self, key: AuthKey) -> datetime | None:
        """The expiry of one entry, or None."""
        raw = self._map.lookup(key.pack())
        return None if raw is None else clock.from_tai_ns(AUTH_VALUE.unpack_from(raw)[0])

    def get_tai_ns(self, key: AuthKey) -> int | None:
        """The raw expiry of one entry in the datapath's time base."""
        raw = self._map.lookup(key.pack())
        return None if raw is None else int(AUTH_VALUE.unpack_from(raw)[0])

    def update(self, key: AuthKey, expires: datetime) -> None:
        """Write one entry."""
        self.update_tai_ns(key, clock.to_tai_ns(expires))

    def update_tai_ns(self, key: AuthKey, expires_tai_ns: int) -> None:
        """Write one entry with an expiry already in the datapath's time base."""
        try:
            self._map.update(key.pack(), AUTH_VALUE.pack(expires_tai_ns))
        except OSError as err:
            raise DatapathError(f"datapath: cannot update the auth map: {err.strerror}") from err

    def update_many(self, entries: Mapping[AuthKey, datetime]) -> None:
        """Write many entries in one syscall (one TAI offset read for all of them)."""
        self.update_packed({k.pack(): v for k, v in entries.items()})

    def delete_many(self, keys: Iterable[AuthKey]) -> int:
        """Delete entries; missing ones are skipped. Return how many were deleted."""
        return self.delete_packed(k.pack() for k in keys)

    def flush(self) -> int:
        """Delete every entry; return how many there were."""
        return self._map.delete_batch([k for k, _ in self._map.items()])


class IpcacheMap(_Map):
    """The ipcache: address prefix (IPv4 or IPv6) -> identity handle and node handle."""

    def items(self) -> list[tuple[Network, IpcacheEntry]]:
        """Every prefix with its entry."""
        result: list[tuple[Network, IpcacheEntry]] = []
        for raw_key, raw_value in self._map.items():
            identity, node, _flags = IPCACHE_VALUE.unpack_from(raw_value)
            result.append((_network_of(raw_key), IpcacheEntry(identity, node)))
        return result

    def get(self, network: Network | str) -> IpcacheEntry | None:
        """The entry stored for exactly this prefix, or None."""
        raw = self._map.lookup(ipcache_key(ip_network(network)))
        if raw is None:
            return None
        identity, node, _flags = IPCACHE_VALUE.unpack_from(raw)
        return IpcacheEntry(identity, node)

    def update_many(self, entries: Mapping[Network, IpcacheEntry]) -> None:
        """Write many prefixes."""
        pairs = [(ipcache_key(n), IPCACHE_VALUE.pack(e.identity, e.node, 0)) for n, e in entries.items()]
        self._update_batch(pairs, "ipcache")

    def delete_many(self, networks: Iterable[Network]) -> int:
        """Delete prefixes; missing ones are skipped. Return how many were deleted."""
        return self._map.delete_batch([ipcache_key(n) for n in networks])


@dataclass(frozen=True, slots=True)
class EndpointOwner:
    """Which host-side interface owns a local workload address, and who recorded it (ENDPOINT_F_*)."""

    ifindex: int
    flags: int

    def __post_init__(self) -> None:
        """Refuse values the map cannot hold."""
        _u32("ifindex", self.ifindex)
        _u32("flags", self.flags)


class EndpointsMap(_Map):
    """The endpoints map: local workload address prefix -> the interface that owns it."""

    def items(self) -> list[tuple[Network, EndpointOwner]]:
        """Every prefix with its owner."""
        return [(_network_of(k), EndpointOwner(*ENDPOINT_VALUE.unpack_from(v))) for k, v in self._map.items()]

    def get(self, network: Network | str) -> EndpointOwner | None:
        """The owner stored for exactly this prefix, or None."""
        raw = self._map.lookup(ipcache_key(ip_network(network)))
        return None if raw is None else EndpointOwner(*ENDPOINT_VALUE.unpack_from(raw))

    def update_many(self, entries: Mapping[Network, EndpointOwner]) -> None:
        """Write many prefixes."""
        pairs = [(ipcache_key(n), ENDPOINT_VALUE.pack(o.ifindex, o.flags)) for n, o in entries.items()]
        self._update_batch(pairs, "endpoints")

    def delete_many(self, networks: Iterable[Network]) -> int:
        """Delete prefixes; missing ones are skipped. Return how many were deleted."""
        return self._map.delete_batch([ipcache_key(n) for n in networks])


class PolicyMap(_Map):
    """The policy map: which (local, remote, direction) need which authentication."""

    def items(self) -> list[tuple[PolicyKey, AuthType]]:
        """Every entry."""
        return [(PolicyKey.unpack(k), AuthType(POLICY_VALUE.unpack_from(v)[0])) for k, v in self._map.items()]

    def update_many(self, entries: Mapping[PolicyKey, AuthType]) -> None:
        """Write many entries (AuthType.NONE exempts a pair from a wildcard)."""
        pairs = [(k.pack(), POLICY_VALUE.pack(v)) for k, v in entries.items()]
        self._update_batch(pairs, "policy")

    def delete_many(self, keys: Iterable[PolicyKey]) -> int:
        """Delete entries; missing ones are skipped. Return how many were deleted."""
        return self._map.delete_batch([k.pack() for k in keys])


class CounterMap(_Map):
    """The per-CPU counters."""

    def read(self) -> dict[str, int]:
        """Every counter by name (``Counter`` member names, lower case), summed over CPUs."""
        return {counter.name.lower(): self._sum(counter) for counter in Counter}

    def _sum(self, index: int) -> int:
        raw = self._map.lookup(struct.pack("=I", index)) or b""
        return sum(struct.unpack(f"={len(raw) // 8}Q", raw))


class VerdictMap(CounterMap):
    """The per-CPU verdict counters, each once per direction (AUTHD_VERDICT_SLOTS)."""

    def read_by_direction(self) -> dict[tuple[str, Direction], int]:
        """Every counter by name and the packet's direction, summed over CPUs (0 for non-verdicts)."""
        return {
            (counter.name.lower(), direction): self._sum(counter + layout.COUNTER_SLOTS * (direction - 1))
            for counter in Counter
            for direction in Direction
        }


@dataclass(frozen=True, slots=True)
class RuntimeConfig:
    """What the programs read from the config map on every packet."""

    flow_level: FlowLevel
    auth_required_interval_ns: int
    tunnel_ifindex: int = 0  # authd's WireGuard interface; 0: encryption not enforced

    def __post_init__(self) -> None:
        """Refuse values the map cannot hold."""
        _u32("tunnel ifindex", self.tunnel_ifindex)


class ConfigMap(_Map):
    """The one-entry config map, writable while the programs run."""

    def read(self) -> RuntimeConfig:
        """The current settings."""
        raw = self._map.lookup(struct.pack("=I", 0)) or CONFIG_VALUE.pack(0, 0, 0)
        level, tunnel, interval = CONFIG_VALUE.unpack_from(raw)
        return RuntimeConfig(FlowLevel(level), interval, tunnel)

    def write(self, config: RuntimeConfig) -> None:
        """Replace the settings; the next packet sees them."""
        self._map.update(
            struct.pack("=I", 0),
            CONFIG_VALUE.pack(config.flow_level, config.tunnel_ifindex, config.auth_required_interval_ns),
        )


def open_map(pin_dir: Path, name: MapName) -> MapHandle:
    """Open one pinned map, with errors that say what to do."""
    path = pin_dir / name
    try:
        return MapHandle(obj_get(path))
    except FileNotFoundError as err:
        raise DatapathError(
            f"datapath: nothing pinned at {path}: is the datapath loaded? (`authd run` loads it)"
        ) from err
    except PermissionError as err:
        raise DatapathError(f"datapath: permission denied opening {path}: run as root") from err
    except OSError as err:
        raise DatapathError(f"datapath: cannot open {path}: {err.strerror}") from err


class PinnedMaps:
    """The maps a control plane writes and reads, opened from their pins."""

    def __init__(self, pin_dir: Path) -> None:
        """Open every map; raise DatapathError naming the first that cannot be opened."""
        self.pin_dir = pin_dir
        handles: list[MapHandle] = []
        try:
            names = (
                MapName.AUTH,
                MapName.IPCACHE,
                MapName.POLICY,
                MapName.COUNTERS,
                MapName.CONFIG,
                MapName.ENDPOINTS,
                MapName.VERDICTS,
            )
            handles.extend(open_map(pin_dir, name) for name in names)
        except DatapathError:
            for handle in handles:
                handle.close()
            raise
        self.auth = AuthMap(handles[0])
        self.ipcache = IpcacheMap(handles[1])
        self.policy = PolicyMap(handles[2])
        self.counters = CounterMap(handles[3])
        self.config = ConfigMap(handles[4])
        self.endpoints = EndpointsMap(handles[5])
        self.verdicts = VerdictMap(handles[6])

    def close(self) -> None:
        """Close every fd (the pins stay)."""
        for m in (
            self.auth,
            self.ipcache,
            self.policy,
            self.counters,
            self.config,
            self.endpoints,
            self.verdicts,
        ):
            m.close()

    def __enter__(self) -> Self:
        """Use as a context manager that closes the fds."""
        return self

    def __exit__(self, *_exc: object) -> None:
        """Close the fds."""
        self.close()
