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

    cluster = commands.add_parser("cluster", help="inspect cluster state")
    cluster_commands = cluster.add_subparsers(title="cluster commands", metavar="COMMAND", required=True)
    cluster_check = cluster_commands.add_parser(
        "check", parents=[with_config], help="validate the cluster state file and summarise it for a node"
    )
    cluster_check.add_argument(
        "--file", type=Path, help="cluster state file (default: cluster.file of the config)"
    )
    cluster_check.add_argument(
        "--node", help="node to summarise (default: node.name of the config, or the host name)"
    )
    cluster_check.set_defaults(command=_cluster_check)

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


def _cluster_check(args: argparse.Namespace) -> int:
    from authd.cluster.desired import attestations, desired_state  # noqa: PLC0415
    from authd.cluster.file import load_cluster  # noqa: PLC0415
    from authd.cluster.handles import HandleRegistry  # noqa: PLC0415
    from authd.cluster.source import local_node_name  # noqa: PLC0415
    from authd.config import load_config  # noqa: PLC0415
    from authd.errors import ClusterStateError  # noqa: PLC0415

    path, node = args.file, args.node
    if path is None or node is None:
        config = load_config(args.config)
        path = path or config.cluster.file
        node = node or local_node_name(config.node.name)
    try:
        state = load_cluster(path)
    except ClusterStateError as err:
        print(f"authd: invalid cluster state {path}:", file=sys.stderr)
        for problem in err.problems or [str(err)]:
            print(f"  {problem}", file=sys.stderr)
        return 1
    identities = state.identities
    print(f"# {path}: valid, version {state.version[:12]}")
    print(
        f"nodes: {len(state.nodes)}, endpoints: {len(state.endpoints)} ({len(identities)} identities), "
        f"policy rules: {len(state.rules)}"
    )
    if state.node(node) is None:
        print(f'node "{node}": not in cluster state', file=sys.stderr)
        return 1
    handles = HandleRegistry(None, node)
    handles.assign(identities, state.nodes)
    desired = desired_state(state, node, handles)
    local = {endpoint.spiffe_id for endpoint in state.endpoints_on(node)}
    print(
        f'node "{node}": {len(local)} local identities, {len(desired.policy)} policy entries, '
        f"{len(desired.pairs)} auth pairs, {len(attestations(desired.pairs))} attestations"
    )
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
