"""Typed decoding of TOML tables into frozen dataclass trees, and rendering them back as TOML.

The config model declares each key once, as a dataclass field made by :func:`setting`, with its type,
default, a one-line description and an optional check. Everything else derives from that declaration:
decoding with error messages that name the key path, the bad value and what is expected; suggestions for
misspelt keys; the documented example file; and the effective config printed by ``authd config check``.

Besides scalars, durations and paths, values may be IP addresses and prefixes (:data:`IpAddress`,
:data:`IpNetwork`) and any class with a ``parse(text)`` classmethod (:class:`TextParsed`, such as
``SpiffeId``) that raises ``ValueError`` or an :class:`~authd.errors.AuthdError` on bad text. Keys declared
with :func:`required` have no default: leaving one out is a problem, and a table missing one is dropped
(the problem is reported once, for the missing key).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import ipaddress
import json
import re
import types
import typing
from collections.abc import Callable, Mapping
from datetime import timedelta
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar, get_args, get_origin

from authd.errors import AuthdError

T = TypeVar("T")

IpAddress = IPv4Address | IPv6Address
"""An IPv4 or IPv6 address; decoded from a string such as ``"10.0.0.1"`` or ``"fd00::1"``."""

IpNetwork = IPv4Network | IPv6Network
"""An IPv4 or IPv6 prefix; decoded from ``"10.1.0.0/24"``, a bare address meaning a host prefix."""

_ADDRESS_TYPES = frozenset({IPv4Address, IPv6Address})
_NETWORK_TYPES = frozenset({IPv4Network, IPv6Network})


class TextParsed(Protocol):
    """A value type written as a string in TOML and built by its ``parse`` classmethod."""

    @classmethod
    def parse(cls, text: str) -> Any:  # noqa: ANN401 - each implementation returns its own class
        """Build the value from text; raise ValueError or an AuthdError naming what is wrong."""
        ...


Check = Callable[[Any], str | None]
"""Returns what the value must be (``"must be an absolute path"``) when it is wrong, else None."""

_DOC = "authd.doc"
_CHECK = "authd.check"
_EXAMPLE = "authd.example"


def setting(default: Any, doc: str, *, check: Check | None = None, example: Any = None) -> Any:  # noqa: ANN401
    """Declare a config key: its default, a one-line description, an optional check.

    ``example`` is shown, commented out, in the documented example for keys whose default is unset.
    """
    return dataclasses.field(default=default, metadata={_DOC: doc, _CHECK: check, _EXAMPLE: example})


def required(doc: str, *, check: Check | None = None, example: Any = None) -> Any:  # noqa: ANN401
    """Declare a key that has no default and must be given."""
    return dataclasses.field(metadata={_DOC: doc, _CHECK: check, _EXAMPLE: example})


def section(cls: type[T], doc: str) -> T:
    """Declare a nested table whose keys all have defaults."""
    return dataclasses.field(default_factory=cls, metadata={_DOC: doc, _CHECK: None, _EXAMPLE: None})


class _Invalid(Exception):  # noqa: N818 - internal signal, never escapes this module
    """One value that does not fit its declared type or check."""


class _Incomplete(Exception):  # noqa: N818 - internal signal, never escapes this module
    """A table lacks a required key, or a required key is invalid; the problem is already recorded."""


# ---------------------------------------------------------------------------------------------- decoding


def decode(cls: type[T], data: Mapping[str, Any], problems: list[str], prefix: str = "") -> T:
    """Build ``cls`` from ``data``, appending one message per problem; bad keys keep their default.

    ``cls`` must give every key a default (nested tables and arrays of tables may have required keys).
    """
    missing = [f.name for f in dataclasses.fields(cls) if _is_required(f)]  # type: ignore[arg-type]
    if missing:
        raise TypeError(f"config: top-level {cls.__name__} needs defaults for {', '.join(missing)}")
    return _decode(cls, data, problems, prefix)


def _is_required(field: dataclasses.Field[Any]) -> bool:
    return field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    # Resolving string annotations compiles them: once per class, not once per table of a large file.
    return typing.get_type_hints(cls)


def _decode(cls: type[T], data: Mapping[str, Any], problems: list[str], prefix: str) -> T:
    hints = _type_hints(typing.cast("type", cls))
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    problems.extend(f"{prefix}{key}: unknown key{_suggest(key, fields)}" for key in data if key not in fields)
    values: dict[str, Any] = {}
    incomplete = False
    for name, field in fields.items():
        keypath = f"{prefix}{name}"
        if name not in data:
            if _is_required(field):
                problems.append(f"{keypath}: missing required key")
                incomplete = True
            continue
        known = len(problems)
        try:
            value = _convert(hints[name], data[name], keypath, problems)
        except _Invalid as err:
            problems.append(f"{keypath}: {err}")
            incomplete = incomplete or _is_required(field)
            continue
        except _Incomplete:
            incomplete = incomplete or _is_required(field)
            continue
        check: Check | None = field.metadata.get(_CHECK)
        # An array with a bad item was reported item by item; checking what is left would mislead.
        complaint = check(value) if check and len(problems) == known else None
        if complaint:
            problems.append(f"{keypath}: {complaint}, got {_describe(data[name])}")
            incomplete = incomplete or _is_required(field)
            continue
        values[name] = value
    if incomplete:
        raise _Incomplete
    decoded = cls(**values)
    # Rules spanning several keys of one table: the table's own ``cross_check()`` names the key at fault.
    cross_check: Callable[[], list[str]] | None = getattr(decoded, "cross_check", None)
    if cross_check is not None:
        problems.extend(f"{prefix}{problem}" for problem in cross_check())
    return decoded


def _suggest(key: str, known: Mapping[str, object]) -> str:
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    return f' (did you mean "{close[0]}"?)' if close else ""


def _convert(tp: Any, value: Any, keypath: str, problems: list[str]) -> Any:  # noqa: ANN401, C901, PLR0911, PLR0912
    origin = get_origin(tp)
    if origin in (types.UnionType, typing.Union):
        inner = [arg for arg in get_args(tp) if arg is not type(None)]
        if frozenset(inner) == _ADDRESS_TYPES:
            return _ip_address(value)
        if frozenset(inner) == _NETWORK_TYPES:
            return _ip_network(value)
        return _convert(inner[0], value, keypath, problems)
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices or type(value) is bool:
            listed = ", ".join(json.dumps(c) for c in choices)
            raise _Invalid(f"must be one of {listed}, got {_describe(value)}")
        return value
    if origin is tuple:
        if not isinstance(value, list):
            raise _Invalid(f"expected an array, got {_describe(value)}")
        item_type = get_args(tp)[0]
        items = []
        for index, item in enumerate(value):
            try:
                items.append(_convert(item_type, item, f"{keypath}[{index}]", problems))
            except _Invalid as err:
                problems.append(f"{keypath}[{index}]: {err}")
            except _Incomplete:
                pass  # the item's own problems name what is missing
        return tuple(items)
    if isinstance(tp, type) and callable(getattr(tp, "parse", None)):
        # Checked before dataclasses: value types such as SpiffeId are dataclasses written as strings.
        return _parse_text(typing.cast("type[TextParsed]", tp), value)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise _Invalid(f"expected a table, got {_describe(value)}")
        return _decode(tp, value, problems, prefix=f"{keypath}.")
    if tp is bool:
        if not isinstance(value, bool):
            raise _Invalid(f"expected true or false, got {_describe(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Invalid(f"expected an integer, got {_describe(value)}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _Invalid(f"expected a number, got {_describe(value)}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise _Invalid(f"expected a string, got {_describe(value)}")
        return value
    if tp is Path:
        if not isinstance(value, str):
            raise _Invalid(f"expected a path string, got {_describe(value)}")
        return Path(value)
    if tp is timedelta:
        if not isinstance(value, str):
            raise _Invalid(
                f'expected a duration string like "10s", "500ms" or "1h30m", got {_describe(value)}'
            )
        return parse_duration(value)
    raise TypeError(f"config: no decoder for {tp!r} at {keypath}")


def _ip_address(value: Any) -> IpAddress:  # noqa: ANN401
    expected = 'expected an IP address like "10.0.0.1" or "fd00::1"'
    if not isinstance(value, str):
        raise _Invalid(f"{expected}, got {_describe(value)}")
    try:
        return ipaddress.ip_address(value)
    except ValueError as err:
        raise _Invalid(f"{expected}, got {_describe(value)}") from err


def _ip_network(value: Any) -> IpNetwork:  # noqa: ANN401
    expected = 'expected an IP prefix like "10.1.0.0/24" or a bare address'
    if not isinstance(value, str):
        raise _Invalid(f"{expected}, got {_describe(value)}")
    try:
        return ipaddress.ip_network(value)
    except ValueError as err:
        # ip_network's own words are clear for the common mistake ("... has host bits set").
        reason = str(err) if "host bits" in str(err) else "not an IP prefix"
        raise _Invalid(f"{expected}, got {_describe(value)} ({reason})") from err


def _parse_text(tp: type[TextParsed], value: Any) -> Any:  # noqa: ANN401
    if not isinstance(value, str):
        raise _Invalid(f"expected a string, got {_describe(value)}")
    try:
        return tp.parse(value)
    except (ValueError, AuthdError) as err:
        message = str(err)
        if repr(value) in message or json.dumps(value) in message:  # the parser quoted the value already
            raise _Invalid(message) from err
        raise _Invalid(f"{message}, got {_describe(value)}") from err


_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str) -> timedelta:
    """Parse ``"1h30m"``, ``"10s"``, ``"250ms"`` into a timedelta; raise _Invalid otherwise."""
    position, seconds = 0, 0.0
    for match in _DURATION_PART.finditer(text):
        if match.start() != position:
            break
        seconds += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        position = match.end()
    if not text or position != len(text):
        raise _Invalid(f'expected a duration like "10s", "500ms" or "1h30m", got {json.dumps(text)}')
    return timedelta(seconds=seconds)


def format_duration(value: timedelta) -> str:
    """Render a timedelta in the shortest form :func:`parse_duration` reads back exactly."""
    millis = round(value.total_seconds() * 1000)
    if millis % 1000:
        return f"{millis}ms"
    seconds = millis // 1000
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _describe(value: Any) -> str:  # noqa: ANN401, PLR0911
    if isinstance(value, bool):
        return f"boolean {json.dumps(value)}"
    if isinstance(value, int):
        return f"integer {value}"
    if isinstance(value, float):
        return f"number {value}"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return type(value).__name__


# ---------------------------------------------------------------------------------------------- rendering


def render(obj: object, *, documented: bool) -> str:
    """Render a config tree as TOML; ``documented`` adds each key's description as a comment."""
    lines: list[str] = []
    _render_table(obj, "", "", lines, documented=documented)
    return "\n".join(lines).strip() + "\n"


def _render_table(obj: object, name: str, doc: str, lines: list[str], *, documented: bool) -> None:
    fields = dataclasses.fields(obj)  # type: ignore[arg-type]
    scalars = [f for f in fields if not dataclasses.is_dataclass(getattr(obj, f.name))]
    tables = [f for f in fields if dataclasses.is_dataclass(getattr(obj, f.name))]
    if name:
        lines.append("")
        if documented:
            lines.append(f"# {doc}")
        lines.append(f"[{name}]")
    for field in scalars:
        value = getattr(obj, field.name)
        if documented:
            lines.append(f"# {field.metadata[_DOC]}")
        if value is None:
            example = field.metadata.get(_EXAMPLE)
            shown = toml_value(example) if example is not None else '"..."'
            lines.append(f"# {field.name} = {shown}")
        else:
            lines.append(f"{field.name} = {toml_value(value)}")
    for field in tables:
        child = f"{name}.{field.name}" if name else field.name
        _render_table(getattr(obj, field.name), child, field.metadata[_DOC], lines, documented=documented)


def toml_value(value: object) -> str:
    """Format one scalar or array as a TOML value."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, timedelta):
        return json.dumps(format_duration(value))
    if isinstance(value, str | Path | IPv4Address | IPv6Address | IPv4Network | IPv6Network):
        return json.dumps(str(value))
    if callable(getattr(type(value), "parse", None)):
        return json.dumps(str(value))
    if isinstance(value, tuple | list):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    raise TypeError(f"config: cannot render {value!r} as TOML")
