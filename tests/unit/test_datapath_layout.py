"""The Python mirror of bpf/include/authd.h matches the compiled object's BTF and the header's enums."""

from __future__ import annotations

import ctypes
import json
import re
import shutil
import struct
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from authd.datapath import events, layout, maps
from authd.datapath.loader import object_path

HEADER = Path(__file__).resolve().parents[2] / "bpf" / "include" / "authd.h"


@cache
def btf_types() -> dict[int, dict[str, Any]]:
    if shutil.which("bpftool") is None:
        pytest.fail("bpftool is required (make system-deps installs it)")
    out = subprocess.run(
        ["bpftool", "btf", "dump", "file", str(object_path()), "format", "raw", "-j"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return {t["id"]: t for t in json.loads(out)["types"]}


def btf_struct(name: str) -> dict[str, Any]:
    found = [t for t in btf_types().values() if t["kind"] == "STRUCT" and t["name"] == name]
    assert len(found) == 1, f"struct {name} not in the object's BTF"
    return found[0]


def btf_size(type_id: int) -> int:
    t = btf_types()[type_id]
    if t["kind"] in ("TYPEDEF", "CONST", "VOLATILE"):
        return btf_size(t["type_id"])
    if t["kind"] == "ARRAY":
        return btf_size(t["type_id"]) * int(t["nr_elems"])
    return int(t["size"])


@pytest.mark.parametrize("mirror", layout.STRUCTS, ids=lambda s: s.c_name)
def test_struct_matches_btf(mirror: type[layout.HeaderStruct]) -> None:
    struct = btf_struct(mirror.c_name)
    assert struct["size"] == ctypes.sizeof(mirror)
    fields = [(f[0], f[1]) for f in mirror._fields_]
    assert [m["name"] for m in struct["members"]] == [name for name, _ in fields]
    for member, (name, ctype) in zip(struct["members"], fields, strict=True):
        assert member["bits_offset"] == getattr(mirror, name).offset * 8, name
        assert btf_size(member["type_id"]) == ctypes.sizeof(ctype), name


def header_enums() -> dict[str, int]:
    text = HEADER.read_text()
    values: dict[str, int] = {}
    for body in re.findall(r"enum \w+ \{(.*?)\};", text, re.DOTALL):
        for name, value in re.findall(r"(AUTHD_\w+)\s*=\s*(\w+)", body):
            values[name] = int(value, 0)
    return values


def header_defines() -> dict[str, str]:
    return dict(re.findall(r"#define (AUTHD_\w+) (\S+)", HEADER.read_text()))


@pytest.mark.parametrize(("enum_type", "prefix"), layout.ENUMS, ids=lambda v: getattr(v, "__name__", v))
def test_enum_matches_header(enum_type: type, prefix: str) -> None:
    in_header = {k.removeprefix(prefix): v for k, v in header_enums().items() if k.startswith(prefix)}
    in_header.pop("COUNT", None)
    assert in_header == {m.name: m.value for m in enum_type}  # type: ignore[attr-defined]


def test_constants_and_map_names_match_header() -> None:
    defines = header_defines()
    assert int(defines["AUTHD_IDENTITY_ANY"].rstrip("U"), 0) == layout.IDENTITY_ANY
    assert int(defines["AUTHD_IDENTITY_WORLD"].rstrip("U"), 0) == layout.IDENTITY_WORLD
    assert int(defines["AUTHD_NODE_LOCAL"].rstrip("U"), 0) == layout.NODE_LOCAL
    assert int(defines["AUTHD_IPCACHE_FAMILY_BITS"]) == layout.IPCACHE_FAMILY_BITS
    assert int(defines["AUTHD_COUNTER_SLOTS"]) == layout.COUNTER_SLOTS
    assert int(defines["AUTHD_VERDICT_SLOTS"]) == layout.VERDICT_SLOTS == 2 * layout.COUNTER_SLOTS
    assert int(defines["AUTHD_TC_HANDLE"], 0) == layout.TC_HANDLE
    assert int(defines["AUTHD_TC_PRIORITY"]) == layout.TC_PRIORITY
    assert int(defines["AUTHD_FLOW_F_PORTS"], 0) == layout.FLOW_F_PORTS
    assert int(defines["AUTHD_FLOW_F_FRAGMENT"], 0) == layout.FLOW_F_FRAGMENT
    assert int(defines["AUTHD_FLOW_F_ARP"], 0) == layout.FLOW_F_ARP
    assert int(defines["AUTHD_FLOW_F_REPLY"], 0) == layout.FLOW_F_REPLY
    assert int(defines["AUTHD_FLOW_RECHECK_NS"].removesuffix("ULL")) == layout.FLOW_RECHECK_NS
    names = {
        k.removeprefix("AUTHD_MAP_"): v.strip('"') for k, v in defines.items() if k.startswith("AUTHD_MAP_")
    }
    assert names == {m.name: m.value for m in layout.MapName}
    assert header_enums()["AUTHD_CNT_COUNT"] == len(layout.Counter) <= layout.COUNTER_SLOTS


def test_program_names_are_in_the_object() -> None:
    funcs = {t["name"] for t in btf_types().values() if t["kind"] == "FUNC"}
    assert {p.value for p in layout.ProgramName} <= funcs


@pytest.mark.parametrize(
    ("fmt", "mirror", "values"),
    [
        (maps.AUTH_KEY, layout.AuthKeyC, (1, 2, 3, 1)),
        (maps.AUTH_VALUE, layout.AuthValue, (2**63 + 5,)),
        (maps.POLICY_KEY, layout.PolicyKeyC, (7, 0xFFFFFFFF, 2)),
        (maps.POLICY_VALUE, layout.PolicyValue, (1,)),
        (maps.IPCACHE_KEY, layout.IpcacheKey, (64, 4, bytes(range(16)))),
        (maps.IPCACHE_VALUE, layout.IpcacheValue, (256, 3, 0)),
        (maps.ENDPOINT_VALUE, layout.EndpointValue, (7, layout.ENDPOINT_F_CNI)),
        (maps.CONFIG_VALUE, layout.ConfigValue, (2, 7, 10**9)),
        (
            events.AUTH_EVENT,
            layout.AuthEventC,
            (1, 3, 99, 256, 257, 4, 1, 2, 1, 4, 6, bytes(range(16)), bytes(range(16, 32))),
        ),
        (
            events.FLOW_EVENT,
            layout.FlowEventC,
            (2, 3, 99, 256, 257, 4, 1, 2, 1, 0, 6, 6, 0x12, 1, 2, 1, 443, 40000, bytes(16), bytes(range(16))),
        ),
    ],
    ids=lambda v: getattr(v, "c_name", ""),
)
def test_struct_formats_match_the_mirror(
    fmt: struct.Struct, mirror: type[ctypes.Structure], values: tuple[Any, ...]
) -> None:
    assert fmt.size == ctypes.sizeof(mirror)
    decoded = mirror.from_buffer_copy(fmt.pack(*values))
    flat: list[Any] = []
    for field in mirror._fields_:
        name = field[0]
        if name.startswith("pad"):
            continue
        value = getattr(decoded, name)
        if isinstance(value, ctypes.Structure):
            flat.extend(getattr(value, f[0]) for f in value._fields_ if not f[0].startswith("pad"))
        elif isinstance(value, ctypes.Array):
            flat.append(bytes(value))
        else:
            flat.append(value)
    assert tuple(flat) == values
