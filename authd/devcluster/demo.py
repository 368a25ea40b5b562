"""``make demo``: a two-node authd cluster on this machine, narrated with what authd itself shows.

Builds a cluster with :class:`~authd.devcluster.cluster.DevCluster` (network namespaces for nodes and
pods, ``authd dev-spire`` for SPIRE, one ``authd run`` per node), then shows, with ``authd observe`` and
``authd bpf`` output:

1. a registered pair allowed from its very first SYN, with ``Auth: SPIRE``;
2. a workload SPIRE does not know denied, "Authentication required";
3. SVIDs rotating under a live connection, which loses nothing;
4. a summary: the datapath's counters and the attestations made;

then tears everything down. Every claim is checked, and the exit status is 0 only if all of them held.
Ctrl-C (or SIGTERM) stops it and still tears down. Run as root: ``python -m authd.devcluster.demo``.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from authd import log
from authd.devcluster import interrupts, leftovers, readings
from authd.devcluster.cluster import ClusterSpec, DevCluster, Rule, WorkloadSpec
from authd.devcluster.narration import Narrator
from authd.devcluster.netns import HarnessError

WORKLOADS = (
    WorkloadSpec("frontend", "node-a", 2101),
    WorkloadSpec("intruder", "node-a", 2102, registered=False),
    WorkloadSpec("backend", "node-b", 2201),
    WorkloadSpec("db", "node-b", 2202),
)
RULES = (Rule("*", "backend"), Rule("*", "db"))
EXIT_INTERRUPTED = 130
OUTLIVE = timedelta(seconds=1)  # how long the rotation part's connection outlives its first entry


def spec(prefix: str, svid_ttl: float) -> ClusterSpec:
    """The demo's cluster."""
    return ClusterSpec(workloads=WORKLOADS, rules=RULES, svid_ttl=svid_ttl, prefix=prefix)


def _clock(when: datetime) -> str:
    """Wall-clock time to a tenth of a second (UTC, as authd's logs and the auth map show it)."""
    return when.astimezone(UTC).strftime("%H:%M:%S.%f")[:-5]


@dataclass
class Demo:
    """The four parts of the story, told against a running cluster."""

    cluster: DevCluster
    say: Narrator
    registered_reports: list[dict[str, Any]] = field(default_factory=list)
    intruder_syns: int = 0

    @property
    def ttl(self) -> float:
        """The SVID lifetime dev-spire issues."""
        return self.cluster.spec.svid_ttl

    def address(self, workload: str) -> str:
        """A workload's IP address."""
        return str(self.cluster.workload(workload).address)

    def introduce(self, build_seconds: float) -> None:
        """What was built, and the auth map before any traffic."""
        cluster, say = self.cluster, self.say
        say.say(
            f"Built in {build_seconds:.1f} s: two nodes (network namespaces on one bridge), each running "
            "`authd run` with its own BPF pins and node channel listener; one SPIRE stand-in "
            "(`authd dev-spire`) with an agent per node; workloads attached to their node by veth pairs, "
            "like pods, each running TCP and UDP echo servers under its own uid, which is how SPIRE's "
            "agent tells them apart."
        )
        for node, net in cluster.network.nodes.items():
            say.show([f"{node}  {net.address}"])
            for w in WORKLOADS:
                if w.node == node:
                    status = "registered" if w.registered else "NOT registered (SPIRE does not know it)"
                    say.show([f"  {w.name:9} uid {w.uid}  {self.address(w.name):12} {status}"])
        say.say(
            "Policy (cluster state): any identity that talks to backend or db must be authenticated; "
            f"enforced on ingress, in the kernel. SVIDs live {self.ttl:g} s (short on purpose: they "
            "rotate during the demo)."
        )
        expiry = cluster.wait_for_entry("node-b", "backend", "frontend")
        say.say(
            "Before any packet was sent, the two authd opened one channel (TLS 1.3, each side presenting "
            "its node SVID and checking the other's exact node ID); over it node-b asked for frontend, "
            "node-a answered with frontend's chain signed by frontend's key for this session and these two "
            "nodes, and node-b wrote the pair into its pinned auth map, valid "
            f"until {_clock(expiry)}, when the first of the two SVIDs expires:"
        )
        say.command(
            "node-b", "authd bpf auth list", cluster.authd("node-b", "bpf", "auth", "list").splitlines()
        )
        names = cluster.handle_names("node-b")
        identities = ", ".join(f"{h} = {n}" for h, n in sorted(names["identity"].items()))
        nodes = ", ".join(f"{h} = {n}" for h, n in sorted(names["node"].items()))
        say.show([f"(handles on node-b: identities {identities}; nodes {nodes})"])

    def registered_pair(self) -> None:
        """Part 1: a registered pair is allowed from its very first SYN."""
        cluster, say = self.cluster, self.say
        say.heading("1. A registered pair: allowed from the very first packet")
        say.say(
            "frontend (node-a) opens a TCP connection to backend (node-b) and exchanges messages for a "
            "second. node-b's datapath looks the pair up in the auth map for every packet, the first SYN "
            "included:"
        )
        report = cluster.tcp("frontend", "backend", duration=1.0)
        self.registered_reports.append(report)
        port = report.get("local_port")
        source = f"{self.address('frontend')}:{port} "
        cluster.wait_for(
            lambda: any(source in line for line in cluster.observe("node-b")), 10, "frontend's SYN flow"
        )
        lines = [line for line in cluster.observe("node-b") if source in line]
        say.command("node-b", "authd observe", lines)
        syn = next((line for line in lines if "TCP Flags: SYN;" in line), "")
        say.check(
            "INGRESS ALLOWED" in syn and "Auth: SPIRE" in syn,
            "the first SYN was ALLOWED with Auth: SPIRE",
        )
        say.check(
            report.get("connected") is True and report.get("syn_retrans") == 0,
            f"SYN retransmissions: {report.get('syn_retrans')} (nothing was dropped, so TCP never "
            f"had to resend; the connection was up in {report.get('connect_ms')} ms)",
        )
        say.check(
            report.get("sent", 0) > 0 and report.get("echoed") == report.get("sent"),
            f"{report.get('echoed')} of {report.get('sent')} messages echoed",
        )
        udp = cluster.udp("frontend", "backend", count=20)
        say.check(
            udp.get("lost") == 0 and udp.get("first_echoed") is True,
            f"UDP too: {udp.get('echoed')} of {udp.get('sent')} datagrams echoed, the first one included",
        )

    def unregistered_workload(self) -> None:
        """Part 2: a workload SPIRE does not know is denied, "Authentication required"."""
        cluster, say = self.cluster, self.say
        say.heading("2. A workload SPIRE does not know: denied")
        say.say(
            "intruder runs on node-a like frontend, but no SPIRE entry matches its uid and cluster state "
            "does not list it. To node-b its address has no identity (`world`), so there is no auth entry "
            'to find: the kernel drops its SYNs and tells authd ("auth required" on the ring buffer), '
            "which has nobody to attest."
        )
        before = cluster.counters("node-b")
        report = cluster.tcp("intruder", "backend", connect_timeout=2.5)
        self.intruder_syns = 1 + int(report.get("syn_retrans", 0))
        source = f"{self.address('intruder')}:{report.get('local_port')} "
        cluster.wait_for(
            lambda: any(source in line for line in cluster.observe("node-b")), 10, "intruder's SYN flow"
        )
        lines = [line for line in cluster.observe("node-b") if source in line]
        say.command("node-b", "authd observe --verdict DROPPED", lines)
        say.check(
            any("Authentication required DROPPED" in line for line in lines),
            "intruder's SYN was DROPPED, drop reason: Authentication required",
        )
        say.check(
            report.get("connected") is False,
            f"intruder never connected: {self.intruder_syns} SYNs sent in 2.5 s, all dropped",
        )
        after = cluster.counters("node-b")
        dropped = after["denied_auth_required"] - before["denied_auth_required"]
        say.check(
            dropped == self.intruder_syns,
            f'node-b\'s datapath counted {dropped} packets denied for "auth required": exactly those SYNs',
        )

    def rotation(self) -> None:
        """Part 3: SVIDs rotate while a connection flows; nothing is dropped."""
        cluster, say = self.cluster, self.say
        say.heading("3. SVIDs rotate under a live connection")
        say.say(
            f"SVIDs here live {self.ttl:g} s and SPIRE renews them at about half their life. An auth "
            "entry expires with the first of its two SVIDs. When frontend's SVID rotates on node-a, node-a "
            "pushes the new proof over the channel at once (nobody polls), and node-b moves the entry's "
            "expiry forward, while traffic flows. frontend now sends a message every 10 ms to backend "
            "until the entry it started with has expired:"
        )
        before = {node: cluster.counters(node) for node in ("node-a", "node-b")}
        first = cluster.wait_for_entry("node-b", "backend", "frontend")
        started = datetime.now(UTC)
        flow = cluster.start_tcp("frontend", "backend")
        say.show([f"{_clock(started)}  entry backend <- frontend@node-a expires {_clock(first)}"])
        seen = [first]
        deadline = time.monotonic() + 2 * self.ttl + 10
        while datetime.now(UTC) < first + OUTLIVE and time.monotonic() < deadline:
            expiry = cluster.auth_expiry("node-b", "backend", "frontend")
            if expiry is not None and expiry != seen[-1]:
                seen.append(expiry)
                now = _clock(datetime.now(UTC))
                say.show([f"{now}  entry renewed, now expires {_clock(expiry)} (an SVID rotated)"])
            time.sleep(0.1)
        report = cluster.finish(flow)
        self.registered_reports.append(report)
        ended = datetime.now(UTC)
        say.show([f"{_clock(ended)}  the entry the connection started with expired at {_clock(first)}"])
        after = {node: cluster.counters(node) for node in ("node-a", "node-b")}
        say.check(
            len(seen) > 1 and ended > first,
            f"the connection outlived its first entry ({len(seen) - 1} renewals)",
        )
        say.check(
            report.get("connected") is True
            and report.get("sent", 0) > 0
            and report.get("echoed") == report.get("sent"),
            f"{report.get('echoed')} of {report.get('sent')} messages echoed",
        )
        say.check(
            report.get("total_retrans") == 0,
            f"TCP retransmissions: {report.get('total_retrans')} (no segment was dropped)",
        )
        drops = sum(readings.denied(after[n]) - readings.denied(before[n]) for n in after)
        say.check(drops == 0, f"denied counters of both nodes unchanged during the connection: {drops} drops")
        denied_flows = readings.from_source(
            cluster.flows("node-b", "--verdict", "DROPPED"),
            self.address("frontend"),
            report.get("local_port"),
        )
        say.check(
            not denied_flows,
            f"no DROPPED flow for this connection in node-b's `authd observe` ({len(denied_flows)})",
        )

    def summary(self) -> None:
        """Part 4: counters and attestations."""
        cluster, say = self.cluster, self.say
        say.heading("4. Summary")
        say.say("The datapath's counters (`authd bpf counters`), in packets:")
        counters = {node: cluster.counters(node) for node in ("node-a", "node-b")}
        rows = [
            ("allowed, no authentication needed", "allowed"),
            ("allowed with a live auth entry", "allowed_auth"),
            ("denied: auth required", "denied_auth_required"),
            ("denied: auth expired", "denied_auth_expired"),
            ("denied: malformed", "denied_malformed"),
        ]
        say.show([f"{'':36}{'node-a':>10}{'node-b':>10}"])
        say.show(
            [f"{label:36}{counters['node-a'][key]:>10}{counters['node-b'][key]:>10}" for label, key in rows]
        )
        attested = cluster.attestations("node-b")
        sessions = {node: cluster.channel_peers(node) for node in ("node-a", "node-b")}
        say.say(
            f'Channel sessions ("channel up" in the authd logs): node-a {len(sessions["node-a"])}, '
            f"node-b {len(sessions['node-b'])}, every one with the other node: one channel for the node "
            "pair, established again whenever a node SVID rotated. Proofs of frontend@node-a verified by "
            f'node-b ("peer attested"): {attested}, the first and one per rotation, pushed by node-a over '
            "that channel. Channels grow with node pairs, proofs with remote identities, never with pairs "
            "of workloads. (node-a asks for nothing: no policy protects a workload on node-a.)"
        )
        denied_registered = [
            flow
            for node in ("node-a", "node-b")
            for flow in cluster.flows(node, "--verdict", "DROPPED")
            if readings.spiffe_id(flow["source"]) is not None
        ]
        retrans = sum(int(r.get("total_retrans", 0)) for r in self.registered_reports)
        say.check(
            not denied_registered and retrans == 0,
            f"drops for pre-registered pairs: {len(denied_registered) + retrans} (no DROPPED flow from a "
            "registered identity, no TCP retransmission on their connections)",
        )
        denied_total = sum(readings.denied(c) for c in counters.values())
        say.check(
            denied_total == self.intruder_syns,
            f"every denied packet ({denied_total}) was one of intruder's SYNs",
        )
        say.check(attested > 0, "node-b attested frontend@node-a")
        say.check(
            set(sessions["node-a"]) == {"node-b"} and set(sessions["node-b"]) == {"node-a"},
            "one channel for the node pair, and no other channel",
        )


def run(prefix: str, svid_ttl: float, logs: Path | None) -> int:
    """Build, narrate, tear down; the exit status."""
    say = Narrator()
    say.title("authd demo: SPIFFE identities enforced in the kernel, on a two-node cluster")
    say.say("Building the cluster (nodes, pods, SPIRE, one authd per node) ...")
    try:
        with (
            interrupts.stop_signals_interrupt(),
            DevCluster(spec(prefix, svid_ttl), keep_logs=logs) as cluster,
        ):
            demo = Demo(cluster, say)
            demo.introduce(say.elapsed())
            demo.registered_pair()
            demo.unregistered_workload()
            demo.rotation()
            demo.summary()
            say.heading("Teardown")
            say.say("Stopping every process and deleting every namespace, link, pin and file ...")
        left = leftovers.remaining(prefix)
        say.check(not left, f"nothing left behind{': ' + ', '.join(left) if left else ''}")
        if logs is not None:
            say.say(f"Logs kept in {logs}.")
    except KeyboardInterrupt:
        say.say("\ndemo interrupted: the cluster was torn down.")
        return EXIT_INTERRUPTED
    except HarnessError as err:
        say.say(f"\ndemo: {err}")
        return 1
    return say.verdict()


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the options; refuse without root."""
    parser = argparse.ArgumentParser(
        prog="python -m authd.devcluster.demo", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--svid-ttl", type=float, default=10.0, help="SVID lifetime in seconds (default 10)")
    parser.add_argument("--prefix", default="adm", help="name prefix of namespaces and pins (default adm)")
    parser.add_argument("--logs", type=Path, help="keep every process's log in this directory")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        Narrator().say("the demo needs root (network namespaces, BPF): run `sudo make demo`")
        return 2
    log.configure("warning", "console")  # the harness's own progress lines stay out of the story
    return run(args.prefix, args.svid_ttl, args.logs)


if __name__ == "__main__":
    raise SystemExit(main())
