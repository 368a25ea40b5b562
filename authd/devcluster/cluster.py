"""A whole authd cluster on one machine: the network, dev-spire, one authd per node, workloads, teardown.

Used as a context manager; leaving it (normally, on an exception or on Ctrl-C) stops every process, unloads
every node's BPF programs and pins, deletes every namespace and removes the working directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import datetime
from ipaddress import ip_network
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Self

import grpc
import structlog

from authd.datapath.maps import AuthKey, PinnedMaps
from authd.devcluster import cni, interrupts, leftovers, readings, traffic
from authd.devcluster.leftovers import BPFFS
from authd.devcluster.netns import HarnessError, Namespaces, Processes, in_netns, sh
from authd.devcluster.network import Network, NodeNet, WorkloadNet
from authd.spire.dev.bundle_api import delete_federated_bundles

log = structlog.get_logger(__name__)

ATTEST_PORT = 4250
ETCD_PORT = 2379
ETCD_PREFIX = "/authd/"
TCP_PORT = 8080
UDP_PORT = 8081
WIREGUARD_INTERFACE = "authd-wg0"


@dataclass(frozen=True, slots=True)
class WorkloadSpec:
    """A workload: its name (the last segment of its SPIFFE ID), node and uid.

    ``registered`` puts it in cluster state, and so in SPIRE through ``authd spire sync``.
    """

    name: str
    node: str
    uid: int
    registered: bool = True


@dataclass(frozen=True, slots=True)
class Rule:
    """A policy rule between workload names (``*`` for any identity)."""

    source: str
    destination: str
    enforce: str = "ingress"
    encrypt: str = "none"


@dataclass(frozen=True, slots=True)
class ClusterSpec:
    """What to build."""

    nodes: tuple[str, ...] = ("node-a", "node-b")
    workloads: tuple[WorkloadSpec, ...] = ()
    rules: tuple[Rule, ...] = ()
    trust_domain: str = "example.org"
    svid_ttl: float = 3600.0
    prefix: str = "adc"
    log_level: str = "info"
    ipv6: bool = False  # dual stack: workloads get an IPv6 address too, in cluster state as well
    federated_trust_domain: str | None = None  # a second trust domain whose bundle every agent holds
    cni: bool = False  # pods made by CNI (ptp, host-local, authd-cni) once authd runs
    source: Literal["file", "etcd"] = "file"  # etcd: one etcd member on the wire holds cluster state
    bundle_stream_reopen: float | None = None  # seconds; None: authd's default
    encryption: bool = False  # mode = "wireguard"
    encryption_backend: Literal["auto", "kernel", "userspace"] = "auto"  # auto: kernel where it can
    timeout_scale: float = 1.0  # the harness's own waits, multiplied (an emulated CPU is slower)

    def spiffe_id(self, workload: str) -> str:
        """The SPIFFE ID of a workload name."""
        return f"spiffe://{self.trust_domain}/ns/demo/sa/{workload}"


@dataclass(frozen=True, slots=True)
class Flow:
    """A running TCP flow and where its report goes."""

    proc: subprocess.Popen[bytes]
    log_path: Path


@dataclass
class _Node:
    net: NodeNet
    config: Path
    notify: Path
    proc: subprocess.Popen[bytes] | None = None


@dataclass
class DevCluster:
    """Builds the cluster described by ``spec`` on enter and removes every trace of it on exit."""

    spec: ClusterSpec
    keep_logs: Path | None = None
    workdir: Path = field(init=False)
    network: Network = field(init=False)
    _nodes: dict[str, _Node] = field(default_factory=dict, init=False)
    _namespaces: Namespaces = field(default_factory=Namespaces, init=False)
    _processes: Processes = field(default_factory=Processes, init=False)
    _spire: subprocess.Popen[bytes] | None = field(default=None, init=False)
    _etcd_url: str = field(default="", init=False)  # with ``source="etcd"``, once etcd is started
    _notify_sockets: dict[str, socket.socket] = field(default_factory=dict, init=False)
    pods: dict[str, cni.Runtime] = field(default_factory=dict, init=False)  # with ``cni``: by workload

    # ------------------------------------------------------------------------------------ lifecycle

    def __enter__(self) -> Self:
        """Build everything; on any failure tear down what was built, then re-raise."""
        try:
            self.up()
        except BaseException:
            self.down()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        """Tear down, keeping logs if asked to."""
        self.down()

    def up(self) -> None:
        """Network, dev-spire, SPIRE entries, one authd per node (READY), workload servers."""
        spec = self.spec
        leftovers.sweep(spec.prefix)
        self.workdir = Path(tempfile.mkdtemp(prefix=f"{spec.prefix}-"))
        leftovers.claim(self.workdir)
        self.workdir.chmod(0o755)  # workloads run as other uids and read the traffic tool from here
        (self.workdir / "logs").mkdir()
        shutil.copy(traffic.__file__, self.workdir / "traffic.py")
        (self.workdir / "traffic.py").chmod(0o644)
        self.network = Network(spec.prefix, self._namespaces, ipv6=spec.ipv6)
        for name in spec.nodes:
            self.network.add_node(name)
        for workload in spec.workloads:
            self.network.add_workload(workload.node, workload.name, attach=not spec.cni)
        self.write_cluster_state(spec)
        self._write_spire_entries()
        self._configure_nodes()
        self.start_spire()
        self.spire_sync()
        for name in self._nodes:
            self.start_authd(name, wait=False)
        for name in self._nodes:
            self.wait_ready(name)
        for workload in spec.workloads if spec.cni else ():
            self.add_pod(workload.name)
        for workload in spec.workloads:
            self.start_servers(workload.name)

    def _configure_nodes(self) -> None:
        """Write every node's config; with ``source="etcd"``, start etcd first and load cluster state."""
        if self.spec.source == "etcd":
            self.start_etcd()
        for name, net in self.network.nodes.items():
            self._nodes[name] = _Node(net, self._write_config(net), self.workdir / f"{name}.notify")
        if self._etcd_url:
            _wait_until(self._pushed, 30, "etcd to take the cluster state")

    def add_pod(self, name: str) -> WorkloadNet:
        """Make a workload's network through CNI, the way a container runtime makes a pod's (``cni``)."""
        workload = self.network.workloads[name]
        node = workload.node
        net = cni.conflist(
            "ptp",
            subnet=str(node.subnet),
            address=str(workload.address),
            subnet6=str(node.subnet6) if node.subnet6 is not None else "",
            address6=str(workload.address6) if workload.address6 is not None else "",
            data_dir=self.workdir / "cni" / node.name,
            pin_dir=self.pin_dir(node.name),
        )
        paths = [cni.bin_dir(self.workdir), cni.REFERENCE_PLUGINS]
        runtime = cni.Runtime(Path("/run/netns") / node.netns, net, paths)
        self.pods[name] = runtime
        return self.network.attach_cni(name, runtime)

    def down(self) -> None:
        """Stop everything, unload every node's datapath, delete namespaces and files.

        Runs to the end even when interrupted again (a second Ctrl-C is held back until it is done), and
        also removes what was started but not yet recorded when an interrupt arrived: every process,
        namespace and pin carrying the cluster's prefix.
        """
        prefix = self.spec.prefix
        with interrupts.deferred():
            self._processes.stop_all()
            leftovers.kill_processes(prefix)
            for notify in self._notify_sockets.values():
                notify.close()
            self._notify_sockets.clear()
            for name, node in self._nodes.items():
                with contextlib.suppress(HarnessError, OSError):
                    self.authd(name, "bpf", "unload")
                with contextlib.suppress(OSError):
                    shutil.rmtree(node.config.parent / "state", ignore_errors=True)
            self._namespaces.delete_all()
            for name in leftovers.namespaces(prefix):
                with contextlib.suppress(HarnessError):
                    sh("ip", "netns", "del", name)
            for pins in BPFFS.glob(f"{prefix}-*"):
                shutil.rmtree(pins, ignore_errors=True)
            workdir = getattr(self, "workdir", None)
            if workdir is not None and workdir.exists():
                if self.keep_logs is not None:
                    with contextlib.suppress(shutil.Error, OSError):
                        shutil.copytree(workdir / "logs", self.keep_logs, dirs_exist_ok=True)
                shutil.rmtree(workdir, ignore_errors=True)

    # ---------------------------------------------------------------------------------- cluster state

    def write_cluster_state(self, spec: ClusterSpec, *, extra: str = "") -> None:
        """Write (atomically replace) the cluster state file every node watches.

        ``extra`` is TOML appended as it is: nodes and endpoints that no authd of this cluster runs.
        """
        self.spec = spec
        lines = [f'trust_domain = "{spec.trust_domain}"', ""]
        for name in spec.nodes:
            address = self.network.nodes[name].address
            lines += ["[[node]]", f'name = "{name}"', f'addresses = ["{address}"]', ""]
        for workload in spec.workloads:
            if not workload.registered or workload.node not in spec.nodes:
                continue
            prefixes = ", ".join(f'"{a}"' for a in self.network.workloads[workload.name].addresses())
            lines += [
                "[[endpoint]]",
                f'spiffe_id = "{spec.spiffe_id(workload.name)}"',
                f'node = "{workload.node}"',
                f"prefixes = [{prefixes}]",
                f'selectors = ["unix:uid:{workload.uid}"]',
                "",
            ]
        for rule in spec.rules:
            source = "*" if rule.source == "*" else spec.spiffe_id(rule.source)
            destination = "*" if rule.destination == "*" else spec.spiffe_id(rule.destination)
            lines += [
                "[[policy]]",
                f'source = "{source}"',
                f'destination = "{destination}"',
                f'enforce = "{rule.enforce}"',
                f'encrypt = "{rule.encrypt}"',
                "",
            ]
        path = self.cluster_file
        staging = path.with_suffix(".tmp")
        staging.write_text("\n".join(lines) + "\n" + extra)
        staging.replace(path)
        if self._nodes and self._etcd_url:
            self.push_cluster_state()

    def push_cluster_state(self) -> str:
        """Load the cluster file into etcd as one transaction (``authd cluster push``, on the first node)."""
        return self.authd(next(iter(self._nodes)), "cluster", "push", str(self.cluster_file))

    def _pushed(self) -> bool:
        try:
            self.push_cluster_state()
        except HarnessError:
            return False  # etcd is not answering yet
        return True

    def start_etcd(self) -> None:
        """Start one etcd member in the fabric namespace, on the wire (``source="etcd"``)."""
        netns, address = self.network.service_address()
        self._etcd_url = f"http://{address}:{ETCD_PORT}"
        peer = "http://127.0.0.1:2380"
        argv = in_netns(netns, [
            "etcd", "--name=devcluster", f"--data-dir={self.workdir / 'etcd'}",
            f"--listen-client-urls={self._etcd_url}", f"--advertise-client-urls={self._etcd_url}",
            f"--listen-peer-urls={peer}", f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=devcluster={peer}", "--logger=zap", "--log-level=warn",
        ])  # fmt: skip
        self._processes.start("etcd", argv, log_path=self.workdir / "logs" / "etcd.log")

    def register(self, workload: str) -> None:
        """Add a workload to cluster state and SPIRE, as an operator would at run time."""
        workloads = tuple(
            replace(w, registered=True) if w.name == workload else w for w in self.spec.workloads
        )
        self.write_cluster_state(replace(self.spec, workloads=workloads))
        self.spire_sync()

    def remove_node(self, node: str) -> None:
        """Remove a node and its workloads from cluster state; they keep running, as a drained node's do."""
        spec = self.spec
        self.write_cluster_state(replace(spec, nodes=tuple(n for n in spec.nodes if n != node)))

    @property
    def cluster_file(self) -> Path:
        """The shared cluster state file."""
        return self.workdir / "cluster.toml"

    # ---------------------------------------------------------------------------------------- SPIRE

    @property
    def spire_dir(self) -> Path:
        """dev-spire's directory (sockets and state)."""
        return self.workdir / "spire"

    def _write_spire_entries(self) -> None:
        lines = []
        for name in self.spec.nodes:
            lines += [
                "[[entry]]",
                f'spiffe_id = "spiffe://{self.spec.trust_domain}/authd/{name}"',
                f'node = "{name}"',
                'selectors = ["unix:uid:0"]',
                "",
            ]
        (self.workdir / "spire-entries.toml").write_text("\n".join(lines))

    def start_spire(self) -> None:
        """Start dev-spire (in the root network namespace: it only serves Unix sockets)."""
        argv = [
            sys.executable, "-m", "authd", "dev-spire",
            "--dir", str(self.spire_dir),
            "--trust-domain", self.spec.trust_domain,
            "--entries", str(self.workdir / "spire-entries.toml"),
            "--svid-ttl", str(self.spec.svid_ttl),
            "--log-format", "json",
        ]  # fmt: skip
        if self.spec.federated_trust_domain is not None:
            argv += ["--federated-trust-domain", self.spec.federated_trust_domain]
        for name in self.spec.nodes:
            argv += [
                "--node",
                name,
                "--authorized-delegate",
                f"spiffe://{self.spec.trust_domain}/authd/{name}",
            ]
        self._spire = self._processes.start(
            "dev-spire", argv, log_path=self.workdir / "logs" / "dev-spire.log"
        )
        _wait_until(
            (self.spire_dir / "server" / "api.sock").exists,
            30 * self.spec.timeout_scale,
            "dev-spire's sockets",
        )

    def stop_spire(self, sig: int = signal.SIGTERM) -> None:
        """Stop dev-spire (SPIRE down)."""
        if self._spire is not None:
            self._processes.stop(self._spire, sig=sig)
            self._spire = None

    def delete_federated_bundle(self, trust_domain: str) -> None:
        """``spire-server bundle delete``: dev-spire stops federating with ``trust_domain``."""
        [(code, message)] = asyncio.run(
            delete_federated_bundles(self.spire_dir / "server" / "api.sock", [trust_domain])
        )
        if code is not grpc.StatusCode.OK:
            raise HarnessError(f"harness: dev-spire did not delete {trust_domain}: {code.name} {message}")

    def spire_sync(self) -> str:
        """Register cluster state's endpoints with dev-spire (``authd spire sync``)."""
        # In a node's namespace: with source="etcd", cluster state is read from etcd on the wire.
        return self.authd(next(iter(self._nodes)), "spire", "sync")

    # ----------------------------------------------------------------------------------------- authd

    def _write_config(self, net: NodeNet) -> Path:
        directory = self.workdir / net.name
        directory.mkdir()
        spire = self.spire_dir / net.name
        config = directory / "authd.toml"
        cluster = (
            f'[cluster]\nsource = "{self.spec.source}"\nfile = "{self.cluster_file}"\n'
            'poll_interval = "200ms"\n'
        )
        if self._etcd_url:
            cluster += (
                f'[cluster.etcd]\nendpoints = ["{self._etcd_url}"]\nprefix = "{ETCD_PREFIX}"\n'
                'retry_initial = "100ms"\nretry_max = "1s"\n'
            )
        reopen = ""
        if self.spec.bundle_stream_reopen is not None:
            reopen = f'bundle_stream_reopen = "{round(self.spec.bundle_stream_reopen * 1000)}ms"\n'
        config.write_text(
            f'[node]\nname = "{net.name}"\nstate_dir = "{directory}/state"\nruntime_dir = "{directory}/run"\n'
            f'[log]\nlevel = "{self.spec.log_level}"\nformat = "json"\n'
            f'[spire]\nworkload_socket = "{spire}/public/api.sock"\n'
            f'admin_socket = "{spire}/private/admin.sock"\n'
            f'server_socket = "{self.spire_dir}/server/api.sock"\n'
            'reconnect_backoff_initial = "100ms"\nreconnect_backoff_max = "2s"\n'
            f"{reopen}{cluster}"
            f'[attest]\nlisten_address = "{net.address}"\nport = {ATTEST_PORT}\n'
            'retry_initial = "200ms"\nretry_max = "2s"\n'
            f'[datapath]\npin_dir = "{BPFFS}/{self.spec.prefix}-{net.name}"\n'
            # With CNI, the link watcher matches the pods' veths too: both attach idempotently.
            + ('interfaces = ["lxc*", "veth*"]\n' if self.spec.cni else 'interfaces = ["lxc*"]\n')
            + (
                f'[encryption]\nmode = "wireguard"\nbackend = "{self.spec.encryption_backend}"\n'
                f'interface = "{WIREGUARD_INTERFACE}"\n'
                if self.spec.encryption
                else ""
            )
        )
        return config

    def start_authd(self, node: str, *, wait: bool = True) -> None:
        """Start authd in the node's network namespace; with ``wait``, return once it sent READY=1."""
        entry = self._nodes[node]
        entry.notify.unlink(missing_ok=True)
        previous = self._notify_sockets.pop(node, None)
        if previous is not None:
            previous.close()
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(str(entry.notify))
        self._notify_sockets[node] = notify
        argv = in_netns(
            entry.net.netns, [sys.executable, "-m", "authd", "run", "--config", str(entry.config)]
        )
        entry.proc = self._processes.start(
            f"authd-{node}", argv, log_path=self.workdir / "logs" / f"authd-{node}.log",
            env={"NOTIFY_SOCKET": str(entry.notify)},
        )  # fmt: skip
        if wait:
            self.wait_ready(node)

    def wait_ready(self, node: str, timeout: float = 60.0) -> None:
        """Wait for READY=1 from the node's authd (``timeout`` seconds, times ``spec.timeout_scale``)."""
        notify = self._notify_sockets[node]
        deadline = time.monotonic() + timeout * self.spec.timeout_scale
        while True:
            remaining = deadline - time.monotonic()
            proc = self._nodes[node].proc
            if remaining <= 0 or (proc is not None and proc.poll() is not None):
                raise HarnessError(
                    f"harness: authd on {node} did not become ready; see {self.log_path(node)}"
                )
            notify.settimeout(min(remaining, 1.0))
            with contextlib.suppress(TimeoutError):
                if "READY=1" in notify.recv(4096).decode().splitlines():
                    return

    def stop_authd(self, node: str, sig: int = signal.SIGTERM) -> int:
        """Stop the node's authd with ``sig`` (SIGKILL for a crash); return its exit status."""
        entry = self._nodes[node]
        if entry.proc is None:
            return 0
        status = self._processes.stop(entry.proc, sig=sig)
        entry.proc = None
        return status

    def signal_authd(self, node: str, sig: int) -> None:
        """Send ``sig`` to the node's running authd (SIGSTOP then SIGCONT: a node whose loop froze)."""
        proc = self._nodes[node].proc
        if proc is None or proc.poll() is not None:
            raise HarnessError(f"harness: authd on {node} is not running")
        os.killpg(proc.pid, sig)

    def authd(self, node: str, *args: str) -> str:
        """Run an ``authd`` command against the node's config, inside the node's namespace."""
        entry = self._nodes[node]
        argv = in_netns(
            entry.net.netns, [sys.executable, "-m", "authd", *args, "--config", str(entry.config)]
        )
        return sh(*argv)

    # ------------------------------------------------------------------------------------- readings

    def pin_dir(self, node: str) -> Path:
        """Where the node's authd pins its maps."""
        return BPFFS / f"{self.spec.prefix}-{node}"

    @contextlib.contextmanager
    def maps(self, node: str) -> Iterator[PinnedMaps]:
        """The node's pinned maps, opened in this process (fast enough to poll)."""
        with PinnedMaps(self.pin_dir(node)) as maps:
            yield maps

    def auth_entries(self, node: str) -> list[dict[str, Any]]:
        """The node's auth map as ``authd bpf auth list --json`` prints it."""
        return [json.loads(line) for line in self.authd(node, "bpf", "auth", "list", "--json").splitlines()]

    def counters(self, node: str) -> dict[str, int]:
        """The node's datapath counters (what ``authd bpf counters`` prints)."""
        with self.maps(node) as maps:
            return maps.counters.read()

    def pair_key(self, node: str, local: str, remote: str) -> AuthKey | None:
        """The auth map key of workload ``local`` (on ``node``) with workload ``remote`` on its node.

        Handles are node-local: they are read from the node's ipcache, so this is None until the node
        has put both workloads there.
        """
        with self.maps(node) as maps:
            mine = maps.ipcache.get(ip_network(self.workload(local).address))
            theirs = maps.ipcache.get(ip_network(self.workload(remote).address))
        if mine is None or theirs is None or mine.node != 0:
            return None
        return AuthKey(mine.identity, theirs.identity, theirs.node)

    def auth_expiry(self, node: str, local: str, remote: str) -> datetime | None:
        """When the node's auth entry for (``local``, ``remote``) expires; None if it has none."""
        key = self.pair_key(node, local, remote)
        if key is None:
            return None
        with self.maps(node) as maps:
            return maps.auth.get(key)

    def wait_for_entry(self, node: str, local: str, remote: str, timeout: float = 30.0) -> datetime:
        """Wait until the node holds a live auth entry for the pair; return its expiry.

        ``timeout`` is in seconds, times ``spec.timeout_scale``.
        """
        found: list[datetime] = []

        def present() -> bool:
            expiry = self.auth_expiry(node, local, remote)
            if expiry is None or expiry <= datetime.now(expiry.tzinfo):
                return False
            found.append(expiry)
            return True

        _wait_until(
            present, timeout * self.spec.timeout_scale, f"{node}'s auth entry for {local} <- {remote}"
        )
        return found[-1]

    def handle_names(self, node: str) -> dict[str, dict[int, str]]:
        """What the node's handles stand for: ``{"identity": {handle: workload}, "node": {handle: node}}``."""
        by_address = {str(a): w for w in self.network.workloads.values() for a in w.addresses()}
        names: dict[str, dict[int, str]] = {"identity": {}, "node": {0: node}}
        with self.maps(node) as maps:
            for network, entry in maps.ipcache.items():
                workload = by_address.get(str(network.network_address))
                if workload is not None:
                    names["identity"][entry.identity] = workload.name
                    names["node"][entry.node] = workload.node.name
        return names

    def observe(self, node: str, *extra: str) -> list[str]:
        """The node's recent flow log lines, as ``authd observe --last 4096`` prints them."""
        return self.authd(node, "observe", "--last", "4096", *extra).splitlines()

    def flows(self, node: str, *extra: str) -> list[dict[str, Any]]:
        """The recent flows in Hubble's JSON (each ``flow`` of ``authd observe -o json``), oldest first."""
        lines = self.observe(node, "-o", "json", *extra)
        return [json.loads(line)["flow"] for line in lines if line.startswith("{")]

    def channel_peers(self, node: str) -> list[str]:
        """The peer node of every channel session the node's authd established ("channel up")."""
        return [
            str(event["node"])
            for event in readings.events(self.log_path(node))
            if event.get("event") == "channel up"
        ]

    def attestations(self, node: str) -> int:
        """How many attestations the node's authd made that brought a new result ("peer attested")."""
        return readings.count_events(self.log_path(node), "peer attested")

    def hubble_socket(self, node: str) -> Path:
        """The node's Hubble Observer socket (``[hubble]``, in its runtime directory)."""
        return self.workdir / node / "run" / "hubble.sock"

    def log_path(self, node: str) -> Path:
        """Where the node's authd logs go."""
        return self.workdir / "logs" / f"authd-{node}.log"

    def wait_for(self, condition: Callable[[], bool], timeout: float, what: str) -> None:
        """Poll ``condition`` until it holds; raise HarnessError naming ``what`` after ``timeout``."""
        _wait_until(condition, timeout, what)

    # ------------------------------------------------------------------------------------ workloads

    def workload(self, name: str) -> WorkloadNet:
        """A workload's network details."""
        return self.network.workloads[name]

    def address(self, name: str, family: int = 4) -> str:
        """A workload's IPv4 (``family`` 4) or IPv6 (6, with ``ClusterSpec.ipv6``) address."""
        workload = self.network.workloads[name]
        if family == 6:
            if workload.address6 is None:
                raise HarnessError("harness: IPv6 needs ClusterSpec(ipv6=True)")
            return str(workload.address6)
        return str(workload.address)

    def _as_workload(self, name: str, argv: list[str]) -> list[str]:
        spec = next(w for w in self.spec.workloads if w.name == name)
        python = shutil.which("python3", path="/usr/bin:/bin") or sys.executable
        tool = [python, str(self.workdir / "traffic.py")]
        drop = ["setpriv", f"--reuid={spec.uid}", f"--regid={spec.uid}", "--clear-groups", "--"]
        return in_netns(self.workload(name).netns, [*drop, *tool, *argv])

    def start_servers(self, name: str) -> None:
        """Start the workload's TCP and UDP echo servers."""
        logs = self.workdir / "logs"
        for kind, port in (("tcp", TCP_PORT), ("udp", UDP_PORT)):
            argv = self._as_workload(name, [f"{kind}-server", "--port", str(port)])
            self._processes.start(f"{name}-{kind}", argv, log_path=logs / f"{name}-{kind}.log")
        within = 10 * self.spec.timeout_scale
        _wait_until(
            lambda: "listening" in (logs / f"{name}-tcp.log").read_text(), within, f"{name}'s TCP server"
        )
        _wait_until(
            lambda: "listening" in (logs / f"{name}-udp.log").read_text(), within, f"{name}'s UDP server"
        )

    def tcp(self, client: str, server: str, *, duration: float = 0.2, interval: float = 0.01,
            connect_timeout: float = 5.0, family: int = 4) -> dict[str, Any]:  # fmt: skip
        """Run a TCP flow from ``client`` to ``server``'s echo server for ``duration`` (> 0) seconds.

        Return the client's report: ``connected``, ``local_port``, ``syn_retrans``, ``sent``, ``echoed``,
        ``total_retrans`` (see :mod:`authd.devcluster.traffic`). ``family`` 6 connects over IPv6.
        """
        if duration <= 0:
            raise HarnessError("harness: tcp() needs a duration; use start_tcp() for a flow that runs on")
        argv = self._as_workload(client, [
            "tcp-flow", "--to", self.address(server, family), "--port", str(TCP_PORT),
            "--duration", str(duration), "--interval", str(interval),
            "--connect-timeout", str(connect_timeout),
        ])  # fmt: skip
        result = subprocess.run(
            argv, capture_output=True, text=True, check=False, timeout=duration + connect_timeout + 60
        )
        return dict(json.loads(result.stdout.strip().splitlines()[-1]))

    def start_tcp(self, client: str, server: str, *, interval: float = 0.01, family: int = 4) -> Flow:
        """Start a TCP flow that runs until :meth:`finish`; its report is written when it stops."""
        argv = self._as_workload(client, [
            "tcp-flow", "--to", self.address(server, family), "--port", str(TCP_PORT),
            "--interval", str(interval),
        ])  # fmt: skip
        log_path = self.workdir / "logs" / f"{client}-to-{server}-flow.log"
        return Flow(self._processes.start(f"{client}-flow", argv, log_path=log_path), log_path)

    def finish(self, flow: Flow) -> dict[str, Any]:
        """Stop a flow started by :meth:`start_tcp` (SIGTERM) and return its report."""
        self._processes.stop(flow.proc)
        reports = [line for line in flow.log_path.read_text().splitlines() if line.startswith("{")]
        if not reports:
            raise HarnessError(f"harness: the flow wrote no report; see {flow.log_path}")
        return dict(json.loads(reports[-1]))

    def udp(self, client: str, server: str, *, count: int = 10, interval: float = 0.01,
            family: int = 4) -> dict[str, Any]:  # fmt: skip
        """Send ``count`` datagrams from ``client`` to ``server``'s echo server; return the report."""
        argv = self._as_workload(client, [
            "udp-flow", "--to", self.address(server, family), "--port", str(UDP_PORT),
            "--count", str(count), "--interval", str(interval),
        ])  # fmt: skip
        result = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=60)
        return dict(json.loads(result.stdout.strip().splitlines()[-1]))


def _wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise HarnessError(f"harness: timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)
