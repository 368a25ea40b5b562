"""What ``authd bpf ...`` shows: the pinned maps as rows, as text tables or JSON, and unloading.

These work on the pins directly, so they work while the daemon is down.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from authd.datapath import attach, layout, links, loader
from authd.datapath.maps import PinnedMaps

Row = dict[str, Any]


class HandleNames(Protocol):
    """What a handle means: the daemon's handle state file (a read-only ``HandleRegistry``)."""

    def identity_name(self, handle: int) -> str | None:
        """The SPIFFE ID behind an identity handle, if assigned."""
        ...

    def node_name(self, handle: int) -> str | None:
        """The node behind a node handle, if assigned."""
        ...


def _handle(value: int) -> str:
    return "ANY" if value == layout.IDENTITY_ANY else str(value)


def _identity(names: HandleNames | None, handle: int) -> str | None:
    """The SPIFFE ID of a handle, "world" for 0 (addresses outside cluster state), "any" for the wildcard."""
    if handle == layout.IDENTITY_WORLD:
        return "world"
    if handle == layout.IDENTITY_ANY:
        return "any"
    return names.identity_name(handle) if names is not None else None


def _node(names: HandleNames | None, handle: int) -> str | None:
    return names.node_name(handle) if names is not None else None


def auth_rows(maps: PinnedMaps, now: datetime | None = None, names: HandleNames | None = None) -> list[Row]:
    """The auth map, soonest expiry first; with ``names``, the SPIFFE IDs and node behind the handles."""
    now = now or datetime.now(UTC)
    return [
        {
            "local": key.local,
            "local_id": _identity(names, key.local),
            "remote": key.remote,
            "remote_id": _identity(names, key.remote),
            "remote_node": key.remote_node,
            "remote_node_name": _node(names, key.remote_node),
            "auth_type": key.auth_type.name,
            "expires": expires.isoformat(),
            "expired": expires <= now,
        }
        for key, expires in sorted(maps.auth.items(), key=lambda item: item[1])
    ]


def ipcache_rows(maps: PinnedMaps, names: HandleNames | None = None) -> list[Row]:
    """The ipcache, by prefix; with ``names``, the SPIFFE ID and node behind the handles."""
    entries = sorted(maps.ipcache.items(), key=lambda item: (item[0].version, item[0]))
    return [
        {
            "prefix": str(net),
            "identity": e.identity,
            "spiffe_id": _identity(names, e.identity),
            "node": e.node,
            "node_name": _node(names, e.node),
        }
        for net, e in entries
    ]


def policy_rows(maps: PinnedMaps, names: HandleNames | None = None) -> list[Row]:
    """The policy map; with ``names``, the SPIFFE IDs behind the handles."""
    entries = sorted(maps.policy.items(), key=lambda item: (item[0].local, item[0].remote, item[0].direction))
    return [
        {
            "local": _handle(key.local),
            "local_id": _identity(names, key.local),
            "remote": _handle(key.remote),
            "remote_id": _identity(names, key.remote),
            "direction": key.direction.name,
            "auth_type": auth_type.name,
        }
        for key, auth_type in entries
    ]


def counter_rows(maps: PinnedMaps) -> list[Row]:
    """Every counter, summed over CPUs."""
    return [{"counter": name, "value": value} for name, value in maps.counters.read().items()]


def table(rows: list[Row], columns: list[str]) -> str:
    """Rows as an aligned text table with upper-case headers."""
    cells = [[c.upper() for c in columns]] + [[_cell(row[c]) for c in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip() for line in cells
    )


def _cell(value: object) -> str:
    return "-" if value is None else str(value)


@dataclass(frozen=True, slots=True)
class Unloaded:
    """What ``authd bpf unload`` removed."""

    interfaces: list[str]
    pins: list[str]


def unload(pin_dir: Path) -> Unloaded:
    """Detach authd's programs and remove the pins.

    The pinned tcx links go wherever their interfaces are; tc filters (kernels without tcx) are removed
    from every interface of this network namespace. ``interfaces`` names this namespace's interfaces
    that had either.
    """
    netns = attach.netns_inode()
    pinned = {
        int(path.name.split("_")[1])
        for path in (pin_dir / attach.LINKS_DIR).glob(f"{netns}_*")
        if not path.name.endswith("_new")
    }
    detached = [
        link.name for link in links.list_links() if loader.detach_tc(link.index) or link.index in pinned
    ]
    return Unloaded(interfaces=detached, pins=loader.remove_pins(pin_dir))
