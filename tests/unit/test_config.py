from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from authd.config import load_config, parse_config, render_effective, render_example
from authd.config.schema import format_duration, parse_duration
from authd.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def problems_of(text: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(text)
    return caught.value.problems


def test_empty_config_gives_defaults() -> None:
    config = parse_config("")
    assert config.log.level == "info"
    assert config.daemon.shutdown_timeout == timedelta(seconds=10)
    assert config.node.name is None


def test_unknown_key_is_named_with_suggestion() -> None:
    assert problems_of('[log]\nlevle = "debug"\n') == ['log.levle: unknown key (did you mean "level"?)']


def test_unknown_section_is_named() -> None:
    assert problems_of("[logg]\n") == ['logg: unknown key (did you mean "log"?)']


def test_unknown_key_without_near_miss_has_no_suggestion() -> None:
    assert problems_of("[daemon]\nfrobnicate = 1\n") == ["daemon.frobnicate: unknown key"]


def test_wrong_type_names_key_path_and_expected_type() -> None:
    assert problems_of("[daemon]\nshutdown_timeout = 10\n") == [
        'daemon.shutdown_timeout: expected a duration string like "10s", "500ms" or "1h30m", got integer 10'
    ]


def test_section_given_as_scalar() -> None:
    assert problems_of("node = 3\n") == ["node: expected a table, got integer 3"]


def test_literal_lists_choices() -> None:
    assert problems_of('[log]\nlevel = "verbose"\n') == [
        'log.level: must be one of "debug", "info", "warning", "error", got "verbose"'
    ]


def test_check_failure_names_value_and_rule() -> None:
    assert problems_of('[node]\nstate_dir = "var/lib/authd"\n') == [
        'node.state_dir: must be an absolute path, got "var/lib/authd"'
    ]


def test_all_problems_reported_at_once() -> None:
    problems = problems_of('[node]\nname = "Bad_Name"\n[log]\nlevel = 1\n[daemon]\nshutdown_timeout = "0s"\n')
    assert [p.split(":")[0] for p in problems] == ["node.name", "log.level", "daemon.shutdown_timeout"]


def test_invalid_toml_is_a_config_error() -> None:
    assert problems_of("[log\n")[0].startswith("<config>: not valid TOML")


def test_missing_file_names_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path / "nope.toml")
    assert caught.value.problems == [f"{tmp_path / 'nope.toml'}: config file not found"]


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("10s", 10), ("500ms", 0.5), ("1h30m", 5400), ("2d", 172800), ("1.5s", 1.5), ("0s", 0)],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["", "10", "s", "10 s", "1x", "-1s", "1s2"])
def test_parse_duration_rejects(text: str) -> None:
    assert "expected a duration" in problems_of(f'[daemon]\nshutdown_timeout = "{text}"\n')[0]


@pytest.mark.parametrize("seconds", [0.25, 1, 59, 60, 90, 3600, 86400, 90061])
def test_format_duration_round_trips(seconds: float) -> None:
    value = timedelta(seconds=seconds)
    assert parse_duration(format_duration(value)) == value


def test_example_file_is_in_step_with_the_model() -> None:
    assert (REPO / "config" / "authd.example.toml").read_text() == render_example()


def test_example_file_validates() -> None:
    load_config(REPO / "config" / "authd.example.toml")


def test_effective_config_round_trips() -> None:
    config = parse_config('[node]\nname = "node-a"\n[log]\nlevel = "debug"\n')
    assert parse_config(render_effective(config)) == config


def test_encryption_is_off_by_default() -> None:
    config = parse_config("")
    assert config.encryption.mode == "off"
    assert config.encryption.backend == "auto"


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ('mode = "ipsec"', 'encryption.mode: must be one of "off", "wireguard", got "ipsec"'),
        ('backend = "ebpf"', 'encryption.backend: must be one of "auto", "kernel", "userspace", got "ebpf"'),
        (
            'interface = "authd-wireguard0"',
            "encryption.interface: must be 1-15 letters, digits, '_', '.' or '-', got \"authd-wireguard0\"",
        ),
        ("listen_port = 0", "encryption.listen_port: must be a port number in 1..65535, got integer 0"),
        (
            'rotation_interval = "30s"',
            'encryption.rotation_interval: must be at least 1m, or 0s for no scheduled rotation, got "30s"',
        ),
        (
            'wireguard_go = "wireguard-go"',
            'encryption.wireguard_go: must be an absolute path, got "wireguard-go"',
        ),
    ],
)
def test_bad_encryption_values_name_the_key(text: str, problem: str) -> None:
    assert problems_of(f"[encryption]\n{text}\n") == [problem]


def test_encryption_without_scheduled_rotation_is_accepted() -> None:
    config = parse_config('[encryption]\nrotation_interval = "0s"\n')
    assert config.encryption.rotation_interval == timedelta(0)


def test_wireguard_mode_is_accepted() -> None:
    config = parse_config('[encryption]\nmode = "wireguard"\nbackend = "userspace"\n')
    assert (config.encryption.mode, config.encryption.backend) == ("wireguard", "userspace")
