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

    _add_dev_spire(commands, common)

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


def _add_dev_spire(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    dev = commands.add_parser(
        "dev-spire",
        parents=[common],
        help="run a SPIRE stand-in (server and one agent per node) for tests and demos",
        description="A SPIRE server and one agent per node in one process, speaking SPIRE's gRPC APIs: "
        "DIR/NODE/public/api.sock (Workload API), DIR/NODE/private/admin.sock (Delegated Identity API), "
        "DIR/server/api.sock (Entry API). State (CA keys, entries) is kept in DIR/server/state.json.",
    )
    dev.add_argument("--dir", type=Path, required=True, help="directory for sockets and state")
    dev.add_argument("--trust-domain", required=True, help="the trust domain, e.g. example.org")
    dev.add_argument("--node", action="append", required=True, help="a node with an agent (repeatable)")
    dev.add_argument("--entries", type=Path, help="TOML file of [[entry]] tables to register at start")
    dev.add_argument("--svid-ttl", type=float, default=3600.0, help="default X509-SVID lifetime, seconds")
    dev.add_argument(
        "--ca-ttl", type=float, default=86400.0, help="CA lifetime, seconds (rotates at 1/2, 5/6)"
    )
    dev.add_argument(
        "--authorized-delegate",
        action="append",
        default=[],
        help="SPIFFE ID allowed on the Delegated Identity API (repeatable); as SPIRE's authorized_delegates",
    )
    dev.add_argument("--federated-trust-domain", help="a second trust domain whose bundle every agent holds")
    dev.add_argument(
        "--log-format", choices=["auto", "json", "console"], default="auto", help="log format (default auto)"
    )
    dev.set_defaults(command=_dev_spire)


def _dev_spire(args: argparse.Namespace) -> int:
    import datetime as dt  # noqa: PLC0415 - keep the CLI's import light

    from authd import log  # noqa: PLC0415
    from authd.config.model import node_name  # noqa: PLC0415
    from authd.errors import SpiffeIdError  # noqa: PLC0415
    from authd.identity import SpiffeId, TrustDomain  # noqa: PLC0415
    from authd.spire.dev.service import DevSpireOptions, run_until_signalled  # noqa: PLC0415

    problems = [f"--node {name!r}: {node_name(name)}" for name in args.node if node_name(name)]
    try:
        options = DevSpireOptions(
            directory=args.dir.absolute(),
            trust_domain=TrustDomain.parse(args.trust_domain),
            nodes=tuple(args.node),
            entries_file=args.entries,
            svid_ttl=dt.timedelta(seconds=args.svid_ttl),
            ca_ttl=dt.timedelta(seconds=args.ca_ttl),
            authorized_delegates=tuple(SpiffeId.parse(text) for text in args.authorized_delegate),
            federated_trust_domain=(
                TrustDomain.parse(args.federated_trust_domain) if args.federated_trust_domain else None
            ),
        )
    except SpiffeIdError as err:
        problems.append(str(err))
    if problems:
        raise ConfigError(problems)
    log.configure(args.log_level or "info", args.log_format)
    asyncio.run(run_until_signalled(options))
    return 0


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
