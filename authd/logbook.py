"""The logbook: the last few warnings and errors the daemon logged, for ``authd status``.

It is a structlog processor (installed by :func:`authd.log.configure`) that copies each warning or error
into a bounded ring as it passes, so the operator asking "what went wrong lately?" gets the answer from
the daemon itself, without access to the journal. Entries keep the constant event text and a few short
fields; the full record is in the journal.
"""

from __future__ import annotations

import collections
from collections.abc import MutableMapping
from dataclasses import dataclass
from typing import Any

SIZE = 32
MAX_FIELDS = 8
MAX_VALUE = 200
_KEPT_LEVELS = frozenset({"warning", "error", "critical", "exception"})
_NOT_FIELDS = frozenset(
    {"event", "level", "timestamp", "exc_info", "exception", "_record", "_from_structlog"}
)


@dataclass(frozen=True, slots=True)
class Entry:
    """One logged warning or error: when (ISO 8601), level, event text, and its short fields."""

    time: str
    level: str
    event: str
    fields: dict[str, str]

    def as_json(self) -> dict[str, Any]:
        """A JSON object for the control socket."""
        return {"time": self.time, "level": self.level, "event": self.event, "fields": self.fields}


class Logbook:
    """A bounded ring of recent warnings and errors; a structlog processor that passes events on unchanged."""

    def __init__(self, size: int = SIZE) -> None:
        """Keep the last ``size`` entries."""
        self._entries: collections.deque[Entry] = collections.deque(maxlen=size)
        self.total = 0

    def __call__(
        self, logger: object, method_name: str, event_dict: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        """Record ``event_dict`` if it is a warning or worse; return it untouched."""
        del logger
        level = str(event_dict.get("level", method_name)).lower()
        if level in _KEPT_LEVELS:
            self.total += 1
            fields = {key: _short(value) for key, value in event_dict.items() if key not in _NOT_FIELDS}
            self._entries.append(
                Entry(
                    time=str(event_dict.get("timestamp", "")),
                    level="error" if level in {"critical", "exception"} else level,
                    event=_short(event_dict.get("event", "")),
                    fields=dict(list(fields.items())[:MAX_FIELDS]),
                )
            )
        return event_dict

    def entries(self) -> list[Entry]:
        """The kept entries, oldest first."""
        return list(self._entries)


def _short(value: object) -> str:
    text = str(value)
    return text if len(text) <= MAX_VALUE else text[: MAX_VALUE - 3] + "..."
