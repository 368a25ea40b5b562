"""Loading and validating authd's TOML configuration.

``load_config`` reads one file, validates all of it and raises one :class:`~authd.errors.ConfigError`
listing every problem, before anything touches the network or the kernel.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

from authd.config.model import Config
from authd.config.schema import decode, render
from authd.errors import ConfigError

__all__ = ["Config", "ConfigError", "load_config", "parse_config", "render_effective", "render_example"]


def load_config(path: Path) -> Config:
    """Read and validate the config file at ``path``."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as err:
        raise ConfigError([f"{path}: config file not found"]) from err
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError([f"{path}: cannot read config file: {err}"]) from err
    return parse_config(text, source=str(path))


def parse_config(text: str, *, source: str = "<config>") -> Config:
    """Validate TOML text as an authd config."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError([f"{source}: not valid TOML: {err}"]) from err
    problems: list[str] = []
    config = decode(Config, data, problems)
    if problems:
        raise ConfigError(problems)
    return config


def render_example() -> str:
    """Render the documented example config: every key with its default and description."""
    header = (
        "# authd configuration: every key with its default and a one-line description.\n"
        "# Generated from authd/config/model.py; a test keeps the two in step.\n"
    )
    return header + "\n" + render(Config(), documented=True)


def render_effective(config: Config) -> str:
    """Render the effective config as TOML, as ``authd config check`` prints it."""
    return render(config, documented=False)
