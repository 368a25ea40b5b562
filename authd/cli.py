"""The ``authd`` command line: parsing, and turning outcomes into exit statuses.

This is the only module that exits the process. Commands import their implementation lazily so that
``authd --help`` and ``authd version`` stay fast and need nothing but the standard library.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from authd import __version__
from authd.errors import AuthdError, ConfigError, DaemonError

if TYPE_CHECKING:
    from authd.config import Config
    from authd.datapath.inspect import HandleNames
    from authd.datapath.maps import PinnedMaps
    from authd.spire.sync import SyncPlan

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

    parser = _Parser(
        prog="authd",
        description="Mutual authentication between workloads, attested by SPIRE, enforced by BPF.",
    )
    parser.add_argument("--version", action="version", version=f"authd {__version__}")
    # Every subcommand's parser is a _Parser too (argparse makes nested ones of the parent's class).
    commands: argparse._SubParsersAction[argparse.ArgumentParser] = parser.add_subparsers(  # type: ignore[assignment]  # a _Parser is an ArgumentParser
        title="commands", metavar="COMMAND", required=True
    )

    run = commands.add_parser("run", parents=[common, with_config], help="run the node daemon")
    run.set_defaults(command=_run)
    reload = commands.add_parser(
        "reload",
        parents=[with_config],
        help="make the running daemon re-read its config; fails, with the reason, if it rejects it",
    )
    reload.set_defaults(command=_reload)

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
        "check",
        parents=[with_config],
        help="validate cluster state (file or etcd) and summarise it for a node",
    )
    cluster_check.add_argument(
        "--file", type=Path, help="cluster state file (default: the configured source, file or etcd)"
    )
    cluster_check.add_argument(
        "--node", help="node to summarise (default: node.name of the config, or the host name)"
    )
    cluster_check.set_defaults(command=_cluster_check)
    cluster_accept = cluster_commands.add_parser(
        "accept",
        parents=[with_config],
        help="apply the cluster state the running daemon holds back as a likely bad deploy",
    )
    cluster_accept.add_argument(
        "--version", help="accept only if the held version starts with this (as `authd status` shows it)"
    )
    cluster_accept.set_defaults(command=_cluster_accept)
    cluster_push = cluster_commands.add_parser(
        "push", parents=[with_config], help="load a cluster file into etcd as one transaction"
    )
    cluster_push.add_argument("file", type=Path, help="the cluster file (refused unless valid)")
    cluster_push.add_argument("--dry-run", action="store_true", help="print the keys that would change")
    cluster_push.set_defaults(command=_cluster_push)
    cluster_export = cluster_commands.add_parser(
        "export", parents=[with_config], help="print the cluster state in etcd as a cluster file"
    )
    cluster_export.set_defaults(command=_cluster_export)

    _add_observe(commands, with_config)
    _add_status(commands, with_config)
    _add_bpf(commands, with_config)
    _add_encryption(commands, with_config)

    _add_dev_spire(commands, common)

    spire = commands.add_parser("spire", help="work with the SPIRE server")
    spire_commands = spire.add_subparsers(title="spire commands", metavar="COMMAND", required=True)
    sync = spire_commands.add_parser(
        "sync",
        parents=[with_config],
        help="make SPIRE's registration entries match the endpoints in cluster state",
        description="Creates one entry per endpoint (its SPIFFE ID, parented to its node's SPIRE agent, with "
        "its selectors) through the server's Entry API at spire.server_socket, and deletes entries it "
        "created earlier that cluster state no longer has. Entries it did not create are never touched.",
    )
    sync.add_argument("--dry-run", action="store_true", help="print what would change, change nothing")
    sync.add_argument("--node", action="append", help="only the endpoints of this node (repeatable)")
    sync.set_defaults(command=_spire_sync)

    version = commands.add_parser("version", help="print the version")
    version.set_defaults(command=_version)
    return parser


class _Parser(argparse.ArgumentParser):
    """Reports an unknown argument with the usage of the (sub)command it was given to, not the top level's."""

    def parse_known_args(  # type: ignore[override]  # typeshed's overloads; same arguments and result
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        parsed, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed, extras


def _add_observe(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], parent: argparse.ArgumentParser
) -> None:
    observe = commands.add_parser(
        "observe",
        parents=[parent],
        help="show policy-verdict flows from the running daemon (like hubble observe)",
        description="Flows as `hubble observe` prints them, read over Hubble's Observer API; filters as "
        "Hubble's. Several --node (or --server) options read several nodes and merge their flows.",
    )
    observe.add_argument(
        "-o", "--output", choices=["compact", "dict", "json", "jsonpb"], default="compact", help="output mode"
    )
    observe.add_argument("--json", dest="output", action="store_const", const="json", help="same as -o json")
    observe.add_argument("--print-node-name", action="store_true", help="print each flow's node name")
    observe.add_argument("-f", "--follow", action="store_true", help="keep printing new flows")
    observe.add_argument("--last", type=int, metavar="N", help="the last N flows (default 20)")
    observe.add_argument("--first", type=int, metavar="N", help="the first N kept flows")
    observe.add_argument(
        "--since", metavar="TIME", help="flows since TIME (RFC 3339) or a duration ago (10m)"
    )
    observe.add_argument("--until", metavar="TIME", help="flows until TIME (RFC 3339) or a duration ago")
    observe.add_argument(
        "--verdict",
        action="append",
        default=[],
        type=str.upper,
        choices=["FORWARDED", "DROPPED", "ALLOWED", "DENIED"],
        help="only flows with this verdict (ALLOWED and DENIED are authd's words for the same)",
    )
    observe.add_argument(
        "--traffic-direction", "--direction", dest="direction", type=str.lower, choices=["ingress", "egress"]
    )
    for flag, dest, what in (
        ("--from-ip", "from_ip", "source IP or CIDR"),
        ("--to-ip", "to_ip", "destination IP or CIDR"),
        ("--ip", "ip", "IP or CIDR on either side"),
        ("--from-port", "from_port", "source port"),
        ("--to-port", "to_port", "destination port"),
        ("--port", "port", "port on either side"),
        ("--protocol", "protocols", "L4 protocol (tcp, udp, sctp)"),
        ("--from-identity", "from_identity", "source SPIFFE ID pattern (* wildcards) or numeric identity"),
        ("--to-identity", "to_identity", "destination SPIFFE ID pattern or numeric identity"),
        ("--identity", "identity", "SPIFFE ID pattern or numeric identity on either side"),
        ("--node-name", "node_names", "node name pattern"),
    ):
        observe.add_argument(
            flag, dest=dest, action="append", default=[], help=f"only flows with this {what}"
        )
    observe.add_argument(
        "--server",
        "--node",
        "--node-socket",
        dest="servers",
        action="append",
        default=[],
        metavar="ADDRESS",
        help="a node's Hubble Observer: socket path, unix:PATH or host:port (repeatable; default: this node)",
    )
    observe.set_defaults(command=_observe)


def _observe(args: argparse.Namespace) -> int:
    import datetime as dt  # noqa: PLC0415 - keep the CLI's import light

    from authd.hubble import printer  # noqa: PLC0415
    from authd.hubble.query import Query, flows  # noqa: PLC0415

    query = Query(
        follow=args.follow,
        last=args.last,
        first=args.first,
        since=args.since,
        until=args.until,
        verdicts=args.verdict,
        direction=args.direction,
        from_ip=args.from_ip,
        to_ip=args.to_ip,
        ip=args.ip,
        from_port=args.from_port,
        to_port=args.to_port,
        port=args.port,
        protocols=args.protocols,
        from_identity=args.from_identity,
        to_identity=args.to_identity,
        identity=args.identity,
        node_names=args.node_names,
    )
    request = query.to_request(dt.datetime.now(dt.UTC))
    if args.servers:
        servers = args.servers
    else:
        config = _config_or_defaults(args.config)
        servers = [str(config.node.runtime_dir / config.hubble.socket_name)]
    first = True
    for response in flows(servers, request):
        if response.HasField("lost_events"):
            lost = response.lost_events.num_events_lost
            print(
                f"authd: {lost} flows lost on {response.node_name} (this client was too slow)",
                file=sys.stderr,
            )
        elif args.output in ("json", "jsonpb"):
            print(printer.to_json(response), flush=args.follow)
        elif args.output == "dict":
            print(
                printer.block(response.flow, first=first, node_name=args.print_node_name), flush=args.follow
            )
        else:
            print(printer.compact(response.flow, node_name=args.print_node_name), flush=args.follow)
        first = False
    if args.follow:  # a followed stream ends only when the daemon goes away
        print("authd: the daemon closed the flow stream (stopped or restarting)", file=sys.stderr)
        return 1
    return 0


def _add_status(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], parent: argparse.ArgumentParser
) -> None:
    status = commands.add_parser(
        "status",
        parents=[parent],
        help="ask the running daemon how it is: SPIRE, SVIDs, peers, auth map, datapath, recent errors",
    )
    status.add_argument("--json", action="store_true", help="the daemon's report as one JSON object")
    status.set_defaults(command=_status)


def _add_encryption(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], parent: argparse.ArgumentParser
) -> None:
    encryption = commands.add_parser("encryption", help="the WireGuard tunnel between nodes")
    sub = encryption.add_subparsers(title="encryption commands", metavar="COMMAND", required=True)
    status = sub.add_parser(
        "status", parents=[parent], help="the backend, this node's key and each peer, with their key ages"
    )
    status.add_argument("--json", action="store_true", help="the daemon's encryption report as JSON")
    status.set_defaults(command=_encryption_status)
    sub.add_parser(
        "rotate",
        parents=[parent],
        help="rotate this node's WireGuard key now; the peers learn it, with new PSKs, over the channels",
    ).set_defaults(command=_encryption_rotate)


def _encryption_status(args: argparse.Namespace) -> int:
    from authd.control import ControlClient, socket_path  # noqa: PLC0415
    from authd.status import render_encryption  # noqa: PLC0415

    config = _config_or_defaults(args.config)
    for report in ControlClient(socket_path(config.node.runtime_dir)).request("status"):
        encryption = report.get("encryption") or {"mode": "off"}
        print(json.dumps(encryption, indent=2) if args.json else "\n".join(render_encryption(encryption)))
        return 0
    raise DaemonError("encryption: the daemon closed the connection without a status report")


def _encryption_rotate(args: argparse.Namespace) -> int:
    from authd.control import ControlClient, socket_path  # noqa: PLC0415

    config = _config_or_defaults(args.config)
    for answer in ControlClient(socket_path(config.node.runtime_dir), timeout=30.0).request(
        "encryption-rotate"
    ):
        print(f"rotated: key {answer['public_key']}, generation {answer['generation']}")
        return 0
    raise DaemonError("encryption: the daemon closed the connection without a verdict")


EX_NOT_RUNNING = 3  # as `systemctl status` for a unit that is not active


def _status(args: argparse.Namespace) -> int:
    from authd.control import ControlClient, socket_path  # noqa: PLC0415
    from authd.errors import ControlError  # noqa: PLC0415
    from authd.status import render  # noqa: PLC0415

    config = _config_or_defaults(args.config)
    path = socket_path(config.node.runtime_dir)
    try:
        reports = list(ControlClient(path).request("status"))
    except ControlError as err:
        if not err.not_running:
            raise
        print(
            f"authd is not running: {err}\n"
            "  start it:   systemctl start authd  (or `authd run --config FILE` in a terminal)\n"
            "  its logs:   journalctl -u authd -e\n"
            f"  the socket: {path} (node.runtime_dir in {args.config})",
            file=sys.stderr,
        )
        return EX_NOT_RUNNING
    if not reports:
        raise ControlError("control: the daemon closed the connection without a status report")
    if args.json:
        print(json.dumps(reports[0], indent=2))
    else:
        print(render(reports[0]))
    return 0


def _add_bpf(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], parent: argparse.ArgumentParser
) -> None:
    bpf = commands.add_parser("bpf", help="inspect the pinned BPF maps (works while the daemon is down)")
    groups = bpf.add_subparsers(title="bpf commands", metavar="COMMAND", required=True)
    as_json = argparse.ArgumentParser(add_help=False)
    as_json.add_argument("--json", action="store_true", help="one JSON object per line")

    auth = groups.add_parser("auth", help="the auth map")
    auth_commands = auth.add_subparsers(title="auth commands", metavar="COMMAND", required=True)
    auth_commands.add_parser("list", parents=[parent, as_json], help="list auth entries").set_defaults(
        command=_bpf_auth_list
    )
    auth_commands.add_parser("flush", parents=[parent], help="delete every auth entry").set_defaults(
        command=_bpf_auth_flush
    )
    for name, function, text in (
        ("ipcache", _bpf_ipcache, "the ipcache (prefix -> identity, node)"),
        ("policy", _bpf_policy, "the policy map"),
    ):
        group = groups.add_parser(name, help=text)
        sub = group.add_subparsers(title=f"{name} commands", metavar="COMMAND", required=True)
        sub.add_parser("list", parents=[parent, as_json], help=f"list {name} entries").set_defaults(
            command=function
        )
    groups.add_parser("counters", parents=[parent, as_json], help="datapath counters").set_defaults(
        command=_bpf_counters
    )
    groups.add_parser(
        "unload", parents=[parent], help="detach the programs from every interface and remove the pins"
    ).set_defaults(command=_bpf_unload)


def _quiet_logs() -> None:
    """Commands that print results keep library chatter (libbpf's notes) out of their output."""
    from authd import log  # noqa: PLC0415

    log.configure("warning", "console")


def _config_or_defaults(path: Path) -> Config:
    """The config at ``path``; built-in defaults when the default file does not exist."""
    from authd.config import Config, load_config  # noqa: PLC0415

    if path == DEFAULT_CONFIG and not path.exists():
        return Config()
    return load_config(path)


def _print_rows(args: argparse.Namespace, rows: list[dict[str, object]], columns: list[str]) -> None:
    from authd.datapath.inspect import table  # noqa: PLC0415

    if args.json:
        for row in rows:
            print(json.dumps(row))
    else:
        print(table(rows, columns))


def _bpf_maps(args: argparse.Namespace) -> PinnedMaps:
    from authd.datapath.maps import PinnedMaps  # noqa: PLC0415

    _quiet_logs()
    return PinnedMaps(_config_or_defaults(args.config).datapath.pin_dir)


def _handle_names(args: argparse.Namespace) -> HandleNames | None:
    """The daemon's handle state, to show SPIFFE IDs and node names next to handles; None if unreadable."""
    from authd.cluster.handles import STATE_FILE, HandleRegistry  # noqa: PLC0415
    from authd.cluster.source import local_node_name  # noqa: PLC0415
    from authd.errors import ClusterStateError  # noqa: PLC0415

    config = _config_or_defaults(args.config)
    path = config.node.state_dir / STATE_FILE
    try:
        return HandleRegistry.read_only(path, local_node_name(config.node.name))
    except ClusterStateError as err:
        print(f"authd: handles shown without names: {err}", file=sys.stderr)
        return None


def _bpf_auth_list(args: argparse.Namespace) -> int:
    from authd.datapath.inspect import auth_rows  # noqa: PLC0415

    with _bpf_maps(args) as maps:
        rows = auth_rows(maps, names=_handle_names(args))
        columns = ["local", "local_id", "remote", "remote_id", "remote_node", "remote_node_name", "expires"]
        _print_rows(args, rows, [*columns, "expired"])
    return 0


def _bpf_auth_flush(args: argparse.Namespace) -> int:
    with _bpf_maps(args) as maps:
        print(f"deleted {maps.auth.flush()} auth entries")
    return 0


def _bpf_ipcache(args: argparse.Namespace) -> int:
    from authd.datapath.inspect import ipcache_rows  # noqa: PLC0415

    with _bpf_maps(args) as maps:
        rows = ipcache_rows(maps, names=_handle_names(args))
        _print_rows(args, rows, ["prefix", "identity", "spiffe_id", "node", "node_name"])
    return 0


def _bpf_policy(args: argparse.Namespace) -> int:
    from authd.datapath.inspect import policy_rows  # noqa: PLC0415

    with _bpf_maps(args) as maps:
        rows = policy_rows(maps, names=_handle_names(args))
        _print_rows(args, rows, ["local", "local_id", "remote", "remote_id", "direction", "auth_type"])
    return 0


def _bpf_counters(args: argparse.Namespace) -> int:
    from authd.datapath.inspect import counter_rows  # noqa: PLC0415

    with _bpf_maps(args) as maps:
        _print_rows(args, counter_rows(maps), ["counter", "value"])
    return 0


def _bpf_unload(args: argparse.Namespace) -> int:
    from authd.datapath.inspect import unload  # noqa: PLC0415

    pin_dir = _config_or_defaults(args.config).datapath.pin_dir
    _quiet_logs()
    result = unload(pin_dir)
    if not result.interfaces and not result.pins:
        print(f"nothing to unload: no authd programs attached here and nothing pinned at {pin_dir}")
        return 0
    print(f"detached from {len(result.interfaces)} interfaces: {', '.join(result.interfaces) or '-'}")
    print(f"removed {len(result.pins)} pins from {pin_dir}: {', '.join(result.pins) or '-'}")
    return 0


def _run(args: argparse.Namespace) -> int:
    from authd import log  # noqa: PLC0415 - keep the CLI's import light
    from authd.config import load_config  # noqa: PLC0415
    from authd.daemon import Daemon  # noqa: PLC0415
    from authd.logbook import Logbook  # noqa: PLC0415

    config = load_config(args.config)
    logbook = Logbook()
    log.configure(args.log_level or config.log.level, config.log.format, logbook=logbook)
    try:
        status = asyncio.run(Daemon(config, args.config, logbook=logbook).run())
    except PermissionError as err:  # not root: the first directory or socket of root's refuses
        raise DaemonError(
            f"run: {err.filename or 'an operation'}: permission denied; authd runs as root "
            "(it loads BPF programs and owns /var/lib/authd and /run/authd): `systemctl start authd`"
        ) from err
    if status != 0:
        # A job that ignored cancellation would make interpreter shutdown wait for it forever.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    return status


def _reload(args: argparse.Namespace) -> int:
    from authd.control import ControlClient, socket_path  # noqa: PLC0415

    config = _config_or_defaults(args.config)
    # Reloading may reattach the datapath: give it longer than a status request.
    for response in ControlClient(socket_path(config.node.runtime_dir), timeout=60.0).request("reload"):
        restart_needed = response.get("restart_needed") or []
        if restart_needed:
            print(f"config reloaded; changes in {', '.join(restart_needed)} apply after a restart")
        else:
            print("config reloaded")
        return 0
    raise DaemonError("reload: the daemon closed the connection without a verdict")


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


def _spire_sync(args: argparse.Namespace) -> int:
    from authd.cluster.tools import load_configured  # noqa: PLC0415 - keep the CLI's import light
    from authd.spire.entries import EntryClient  # noqa: PLC0415
    from authd.spire.sync import sync  # noqa: PLC0415

    _quiet_logs()
    config = _config_or_defaults(args.config)
    state = asyncio.run(load_configured(config.cluster))

    async def run() -> SyncPlan:
        async with EntryClient(config.spire.server_socket) as client:
            return await sync(client, state, nodes=args.node, dry_run=args.dry_run)

    plan = asyncio.run(run())
    verb = "would " if args.dry_run else ""
    for entry in plan.create:
        selectors = ",".join(str(s) for s in entry.selectors)
        print(f"{verb}create {entry.spiffe_id} parent={entry.parent_id} selectors={selectors}")
    for entry in plan.delete:
        print(f"{verb}delete {entry.spiffe_id} parent={entry.parent_id} id={entry.id}")
    print(f"{len(plan.create)} to create, {len(plan.delete)} to delete, {plan.unchanged} unchanged")
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


def _cluster_accept(args: argparse.Namespace) -> int:
    from authd.control import ControlClient, socket_path  # noqa: PLC0415

    config = _config_or_defaults(args.config)
    client = ControlClient(socket_path(config.node.runtime_dir))
    for answer in client.request("cluster-accept", version=args.version or ""):
        print(
            f"accepted version {answer['accepted']}: {answer['nodes']} nodes, {answer['endpoints']} endpoints"
        )
    return 0


def _cluster_push(args: argparse.Namespace) -> int:
    from authd.cluster.tools import push  # noqa: PLC0415
    from authd.errors import ClusterStateError  # noqa: PLC0415

    _quiet_logs()
    config = _config_or_defaults(args.config)
    try:
        plan = asyncio.run(push(config.cluster, args.file, dry_run=args.dry_run))
    except ClusterStateError as err:
        print(f"authd: invalid cluster state {args.file}, nothing pushed:", file=sys.stderr)
        for problem in err.problems or [str(err)]:
            print(f"  {problem}", file=sys.stderr)
        return 1
    verb = "would " if args.dry_run else ""
    for word, keys in (("add", plan.added), ("change", plan.changed), ("remove", plan.removed)):
        for key in keys:
            print(f"{verb}{word} {config.cluster.etcd.prefix}{key}")
    done = "at revision" if not args.dry_run else "against revision"
    print(
        f"{len(plan.added)} to add, {len(plan.changed)} to change, {len(plan.removed)} to remove "
        f"({done} {plan.revision})"
    )
    return 0


def _cluster_export(args: argparse.Namespace) -> int:
    from authd.cluster.etcdcodec import render_toml  # noqa: PLC0415
    from authd.cluster.tools import read_etcd  # noqa: PLC0415

    _quiet_logs()
    config = _config_or_defaults(args.config)
    revision, state = asyncio.run(read_etcd(config.cluster.etcd))
    print(f"# exported from etcd {config.cluster.etcd.prefix} at revision {revision}")
    print(render_toml(state), end="")
    return 0


def _cluster_check(args: argparse.Namespace) -> int:
    from authd.cluster.desired import attestations, desired_state  # noqa: PLC0415
    from authd.cluster.file import load_cluster  # noqa: PLC0415
    from authd.cluster.handles import HandleRegistry  # noqa: PLC0415
    from authd.cluster.source import local_node_name  # noqa: PLC0415
    from authd.cluster.tools import describe, load_configured  # noqa: PLC0415
    from authd.config import load_config  # noqa: PLC0415
    from authd.errors import ClusterStateError  # noqa: PLC0415

    path, node = args.file, args.node
    cluster = None
    if path is None or node is None:
        config = load_config(args.config)
        cluster = config.cluster
        node = node or local_node_name(config.node.name)
    where = str(path) if path is not None or cluster is None else describe(cluster)
    try:
        state = (
            load_cluster(path)
            if path is not None or cluster is None
            else asyncio.run(load_configured(cluster))
        )
    except ClusterStateError as err:
        print(f"authd: invalid cluster state {where}:", file=sys.stderr)
        for problem in err.problems or [str(err)]:
            print(f"  {problem}", file=sys.stderr)
        return 1
    identities = state.identities
    print(f"# {where}: valid, version {state.version[:12]}")
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
