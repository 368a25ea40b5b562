from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from authd.config import parse_config
from authd.datapath.enforcement import map_sizes, runtime_config
from authd.datapath.layout import FlowLevel
from authd.errors import ConfigError


def problems_of(text: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(text)
    return caught.value.problems


def test_defaults() -> None:
    datapath = parse_config("").datapath
    assert datapath.enabled
    assert datapath.pin_dir == Path("/sys/fs/bpf/authd")
    assert datapath.interfaces == ()
    assert runtime_config(datapath).flow_level is FlowLevel.FIRST
    assert runtime_config(datapath).auth_required_interval_ns == 1_000_000_000
    assert map_sizes(datapath).events_bytes == 4 * 1024 * 1024


def test_a_full_section() -> None:
    datapath = parse_config(
        '[datapath]\nenabled = false\npin_dir = "/sys/fs/bpf/x"\ninterfaces = ["lxc*", "wg0"]\n'
        'flow_events = "denied"\nauth_required_interval = "250ms"\nauth_map_entries = 1024\n'
        "events_ring_bytes = 65536\n"
    ).datapath
    assert not datapath.enabled
    assert datapath.interfaces == ("lxc*", "wg0")
    assert datapath.auth_required_interval == timedelta(milliseconds=250)
    assert runtime_config(datapath) == runtime_config(datapath)
    assert runtime_config(datapath).flow_level is FlowLevel.DENIED
    assert map_sizes(datapath).auth == 1024


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("events_ring_bytes = 5000", "datapath.events_ring_bytes: must be a power of two between 4096"),
        ("events_ring_bytes = 2048", "datapath.events_ring_bytes: must be a power of two between 4096"),
        ("auth_map_entries = 0", "datapath.auth_map_entries: must be between 1 and 16777216, got integer 0"),
        ('interfaces = ["eth0", "a/b"]', "datapath.interfaces: must be glob patterns of interface names"),
        ('interfaces = [""]', "datapath.interfaces: must be glob patterns"),
        ('flow_events = "some"', 'datapath.flow_events: must be one of "none", "denied", "first", "all"'),
        ('auth_required_interval = "0s"', "datapath.auth_required_interval: must be between 1ms and 1h"),
        ('pin_dir = "bpf/authd"', "datapath.pin_dir: must be an absolute path"),
    ],
)
def test_bad_values_are_named(text: str, problem: str) -> None:
    (found,) = problems_of(f"[datapath]\n{text}\n")
    assert found.startswith(problem), found
