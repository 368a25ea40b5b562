"""The ``authd`` command line: parsing, and turning outcomes into exit statuses.

This is the only module that exits the process. Commands import their implementation lazily so that
``authd --help`` and ``authd version`` stay fast and need nothing but the standard library.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from authd import __version__
from authd.errors import AuthdError, ConfigError

EX_CONFIG = 78  # sysexits.h: configuration error
DEFAULT_CONFIG = Path("/etc/authd/authd.toml")

Command = Callable[[argparse.Namespace], int]


def main(argv: Sequence[str] | None = None) -> None:
    """Run the CLI and exit with the command's status."""
    parser = _parser()
    args = parser.parse_args(argv)
    command: Command = args.command
    try:
        status = command(args)
    except ConfigError as err:
        _print_config_error(args, err)
        status = EX_CONFIG
    except AuthdError as err:
        print(f"authd: {err}", file=sys.stderr)
        status = 1
    except KeyboardInterrupt:
        status = 130
    sys.stdout.flush()
    sys.exit(status)


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        help="override log.level from the config",
    )
    with_config = argparse.ArgumentParser(add_help=False)
    with_config.add_argument(
        "--config", type=Path, default=DEFAULT_CONFIG, help=f"config file (default {DEFAULT_CONFIG})"
    )

    parser = argparse.ArgumentParser(
        prog="authd",
        description="Mutual authentication between workloads, attested by SPIRE, enforced by BPF.",
    )
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)

    run = commands.add_parser("run", parents=[common, with_config], help="run the node daemon")
    run.set_defaults(command=_run)

    config = commands.add_parser("config", help="inspect configuration")
    config_commands = config.add_subparsers(title="config commands", metavar="COMMAND", required=True)
    check = config_commands.add_parser(
        "check", parents=[with_config], help="validate a config file and print the effective config"
    )
    check.set_defaults(command=_config_check)
    example = config_commands.add_parser("example", help="print the documented example config")
    example.set_defaults(command=_config_example)

    version = commands.add_parser("version", help="print the version")
    version.set_defaults(command=_version)
    return parser


def _run(args: argparse.Namespace) -> int:
    from authd import log  # noqa: PLC0415 - keep the CLI's import light
    from authd.config import load_config  # noqa: PLC0415
    from authd.daemon import Daemon  # noqa: PLC0415

    config = load_config(args.config)
    log.configure(args.log_level or config.log.level, config.log.format)
    status = asyncio.run(Daemon(config, args.config).run())
    if status != 0:
        # A job that ignored cancellation would make interpreter shutdown wait for it forever.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    return status


def _config_check(args: argparse.Namespace) -> int:
    from authd.config import load_config, render_effective  # noqa: PLC0415

    config = load_config(args.config)
    print(f"# {args.config}: valid")
    print(render_effective(config), end="")
    return 0


def _config_example(_args: argparse.Namespace) -> int:
    from authd.config import render_example  # noqa: PLC0415

    print(render_example(), end="")
    return 0


def _version(_args: argparse.Namespace) -> int:
    print(f"authd {__version__}")
    return 0


def _print_config_error(args: argparse.Namespace, err: ConfigError) -> None:
    source = getattr(args, "config", None)
    header = f"authd: invalid config {source}:" if source else "authd: invalid config:"
    print(header, file=sys.stderr)
    for problem in err.problems:
        print(f"  {problem}", file=sys.stderr)
