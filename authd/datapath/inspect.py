"""What ``authd bpf ...`` shows: the pinned maps as rows, as text tables or JSON, and unloading.

These work on the pins directly, so they work while the daemon is down.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from authd.datapath import layout, links, loader
from authd.datapath.maps import PinnedMaps

Row = dict[str, Any]


def _handle(value: int) -> str:
    return "ANY" if value == layout.IDENTITY_ANY else str(value)


def auth_rows(maps: PinnedMaps, now: datetime | None = None) -> list[Row]:
    """The auth map, soonest expiry first."""
    now = now or datetime.now(UTC)
    return [
        {
            "local": key.local,
            "remote": key.remote,
            "remote_node": key.remote_node,
            "auth_type": key.auth_type.name,
            "expires": expires.isoformat(),
            "expired": expires <= now,
        }
        for key, expires in sorted(maps.auth.items(), key=lambda item: item[1])
    ]


def ipcache_rows(maps: PinnedMaps) -> list[Row]:
    """The ipcache, by prefix."""
    entries = sorted(maps.ipcache.items(), key=lambda item: (item[0].version, item[0]))
    return [{"prefix": str(net), "identity": e.identity, "node": e.node} for net, e in entries]


def policy_rows(maps: PinnedMaps) -> list[Row]:
    """The policy map."""
    entries = sorted(maps.policy.items(), key=lambda item: (item[0].local, item[0].remote, item[0].direction))
    return [
        {
            "local": _handle(key.local),
            "remote": _handle(key.remote),
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
    cells = [[c.upper() for c in columns]] + [[str(row[c]) for c in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip() for line in cells
    )


@dataclass(frozen=True, slots=True)
class Unloaded:
    """What ``authd bpf unload`` removed."""

    interfaces: list[str]
    pins: list[str]


def unload(pin_dir: Path) -> Unloaded:
    """Detach authd's programs from every interface of this network namespace and remove the pins."""
    detached = [link.name for link in links.list_links() if loader.detach(link.index)]
    return Unloaded(interfaces=detached, pins=loader.remove_pins(pin_dir))
