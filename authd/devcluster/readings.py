"""Reading what a cluster's processes wrote: authd's JSON logs, and the flows ``authd observe`` printed.

authd logs one JSON object per line under the harness (``[log] format = "json"``); lines that are not
JSON (a traceback, an interpreter warning) are skipped by the counters and kept by :func:`tail`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def events(path: Path) -> Iterator[dict[str, Any]]:
    """Every JSON log record in ``path``, oldest first (nothing if the file does not exist)."""
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return
    for line in text.splitlines():
        if not line.startswith("{"):
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            yield record


def count_events(path: Path, event: str) -> int:
    """How many records in ``path`` have this event text."""
    return sum(1 for record in events(path) if record.get("event") == event)


def tail(path: Path, lines: int = 40, *, min_level: str = "warning") -> list[str]:
    """The last ``lines`` lines at ``min_level`` or above, and every line that is not a JSON record."""
    order = ["debug", "info", "warning", "error", "critical"]
    floor = order.index(min_level)
    kept: list[str] = []
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            kept.append(line)
            continue
        level = record.get("level") if isinstance(record, dict) else None
        if level not in order or order.index(level) >= floor:
            kept.append(line)
    return kept[-lines:]


def denied(counters: dict[str, int]) -> int:
    """Packets the datapath dropped, every reason together."""
    return sum(value for name, value in counters.items() if name.startswith("denied_"))


def from_source(flows: list[dict[str, Any]], address: str, port: int | None = None) -> list[dict[str, Any]]:
    """The flows (Hubble's JSON) sent from ``address`` (and ``port``, if given)."""
    return [
        flow
        for flow in flows
        if flow["IP"]["source"] == address and (port is None or source_port(flow) == port)
    ]


def source_port(flow: dict[str, Any]) -> int | None:
    """A flow's source port (TCP, UDP or SCTP), in Hubble's JSON."""
    for l4 in flow.get("l4", {}).values():
        return int(l4.get("source_port", 0))
    return None


def tcp_flags(flow: dict[str, Any]) -> set[str]:
    """The TCP flags set on a flow's packet, in Hubble's JSON."""
    return set(flow.get("l4", {}).get("TCP", {}).get("flags", {}))


def spiffe_id(endpoint: dict[str, Any]) -> str | None:
    """The SPIFFE ID among an endpoint's labels (``spiffe:id=...``), if it has one."""
    for label in endpoint.get("labels", []):
        if label.startswith("spiffe:id="):
            return str(label.removeprefix("spiffe:id="))
    return None
