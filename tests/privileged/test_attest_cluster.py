"""Issues 5 and 12 across real processes: two ``authd run`` nodes, dev-spire, node channels, auth maps.

The cluster is :mod:`authd.devcluster` (prefix ``aap``): each node is a network namespace on a shared
bridge, with its own address, its own authd and its own pinned maps (``/sys/fs/bpf/aap-<node>``), and
workloads attached by veths the datapath enforces on. Namespaces rather than 127.0.0.x because the
listener and the client then use the node addresses cluster state lists, the first SYN between two
workloads crosses the real programs, and probes can be run from inside a node (its address, its source
rate bucket) against the other node's listener. SVIDs live ``TTL`` seconds, so rotations happen during
the module.

The tests share one cluster and run in file order: the last one stops node A's authd.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import signal
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Collection, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from authd.attest.tls import client_context
from authd.datapath.maps import PinnedMaps
from authd.datapath.netns import run_in_netns
from authd.devcluster.cluster import ClusterSpec, DevCluster, Rule, WorkloadSpec
from authd.devcluster.netns import NETNS_DIR, in_netns
from authd.identity import Selector, SpiffeId, TrustDomain, sni_for
from authd.spire._proto import delegatedidentity_pb2
from authd.spire.delegated import SUBSCRIBE_X509_SVIDS, parse_svid_with_key, selectors_to_proto
from authd.spire.dev.ca import CaSlot
from authd.spire.dev.state import mint_svid
from authd.spire.endpoint import Endpoint
from authd.x509svid import BundleSet, X509Svid
from tests.fakes.ca import LeafOptions, TestCA
from tests.privileged.flood import Flood
from tests.privileged.foreign_node import ForeignNode
from tests.privileged.hostile_proofs import hostile_svids
from tests.privileged.test_operations import http_get
from tests.privileged.test_operations import sample as sample_metric

pytestmark = pytest.mark.privileged

TTL = 10.0
FEDERATED = "federated.org"
REOPEN = 1.0  # seconds between two openings of the bundle stream
SPEC = ClusterSpec(
    nodes=("node-a", "node-b"),
    workloads=(
        WorkloadSpec("web", "node-a", 3101),
        WorkloadSpec("api", "node-a", 3102),
        WorkloadSpec("db", "node-b", 3103),
    ),
    rules=(Rule("web", "db", "both"), Rule("api", "db", "both")),
    svid_ttl=TTL,
    prefix="aap",
    federated_trust_domain=FEDERATED,
    bundle_stream_reopen=REOPEN,
)
Key = tuple[str, str, str]  # (local workload, remote workload, remote node) as names
Issued = tuple[dt.datetime, str, dt.datetime]  # (when seen, workload name, the new SVID's notAfter)


def sid(workload: str) -> SpiffeId:
    return SpiffeId.parse(SPEC.spiffe_id(workload))


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@pytest.fixture(scope="module")
def cluster() -> Iterator[DevCluster]:
    with DevCluster(SPEC) as dc:
        yield dc


# ------------------------------------------------------------------------------------------- reading


class AuthView:
    """A node's auth map read from its pins, keys named through the node's handle state file."""

    def __init__(self, dc: DevCluster, node: str) -> None:
        self.node = node
        self.handles = dc.workdir / node / "state" / "handles.json"
        self.maps = PinnedMaps(Path(f"/sys/fs/bpf/{SPEC.prefix}-{node}"))

    def entries(self) -> dict[Key, dt.datetime]:
        document = json.loads(self.handles.read_text())
        names = {handle: spiffe_id.rsplit("/", 1)[1] for spiffe_id, handle in document["identities"].items()}
        nodes = {handle: name for name, handle in document["nodes"].items()} | {0: self.node}
        return {
            (names[key.local], names[key.remote], nodes[key.remote_node]): expires
            for key, expires in self.maps.auth.items()
            if key.local in names and key.remote in names and key.remote_node in nodes
        }

    def close(self) -> None:
        self.maps.close()


@contextlib.contextmanager
def auth_maps(dc: DevCluster) -> Iterator[dict[str, AuthView]]:
    views = {node: AuthView(dc, node) for node in SPEC.nodes}
    try:
        yield views
    finally:
        for view in views.values():
            view.close()


EXPECTED: dict[str, set[Key]] = {
    "node-a": {("web", "db", "node-b"), ("api", "db", "node-b")},
    "node-b": {("db", "web", "node-a"), ("db", "api", "node-a")},
}


async def _issued(admin: Path, uid: int, spiffe_id: SpiffeId) -> AsyncIterator[X509Svid]:
    """Every SVID dev-spire issues for ``spiffe_id`` from now on (the node's Delegated Identity API)."""
    request = delegatedidentity_pb2.SubscribeToX509SVIDsRequest(
        selectors=selectors_to_proto([Selector("unix", f"uid:{uid}")])
    )
    async with Endpoint.unix(admin).channel() as channel:
        method = channel.unary_stream(
            SUBSCRIBE_X509_SVIDS,
            request_serializer=delegatedidentity_pb2.SubscribeToX509SVIDsRequest.SerializeToString,
            response_deserializer=delegatedidentity_pb2.SubscribeToX509SVIDsResponse.FromString,
        )
        async for message in method(request):
            for item in message.x509_svids:
                svid = parse_svid_with_key(item)
                if svid.spiffe_id == spiffe_id:
                    yield svid


async def _workload_svid(admin: Path, uid: int, spiffe_id: SpiffeId) -> X509Svid:
    """The SVID dev-spire currently issues for ``spiffe_id``."""
    async for svid in _issued(admin, uid, spiffe_id):
        return svid
    raise AssertionError(f"dev-spire issues no SVID for {spiffe_id}")


@contextlib.contextmanager
def watching_svids(
    dc: DevCluster, names: Collection[str]
) -> Iterator[list[tuple[dt.datetime, str, dt.datetime]]]:
    """(when seen, workload, notAfter) of every SVID dev-spire issues to these workloads while the block runs.

    Seen on the same streams, at the same moment, as the node's authd receives them.
    """
    seen: list[Issued] = []
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()

    async def follow(name: str) -> None:
        workload = next(w for w in SPEC.workloads if w.name == name)
        admin = dc.spire_dir / workload.node / "private" / "admin.sock"
        async for svid in _issued(admin, workload.uid, sid(name)):
            seen.append((now(), name, svid.not_after))  # noqa: PERF401 - as each arrives, not at the end

    async def main() -> None:
        tasks = [asyncio.ensure_future(follow(name)) for name in names]
        await stop.wait()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), name="svid-watch")
    thread.start()
    try:
        yield seen
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(10)
        loop.close()


def current_not_after(dc: DevCluster) -> dict[str, dt.datetime]:
    """notAfter of every workload's SVID as dev-spire issues it right now."""

    async def fetch() -> dict[str, dt.datetime]:
        result = {}
        for workload in SPEC.workloads:
            admin = dc.spire_dir / workload.node / "private" / "admin.sock"
            svid = await _workload_svid(admin, workload.uid, sid(workload.name))
            result[workload.name] = svid.not_after
        return result

    return asyncio.run(fetch())


def authorities(dc: DevCluster) -> dict[str, TestCA]:
    """dev-spire's signing CAs (from its state file), to mint certificates as if it had issued them."""
    state = json.loads((dc.spire_dir / "server" / "state.json").read_text())
    found = {}
    for name, authority in state["authorities"].items():
        slot = CaSlot.from_state(authority["current"])
        found[name] = TestCA(TrustDomain(name), slot.key, slot.cert)
    return found


def log_events(path: Path, offset: int, event: str) -> list[dict[str, object]]:
    """The JSON log records of ``event`` written after ``offset`` bytes."""
    with path.open("rb") as stream:
        stream.seek(offset)
        lines = stream.read().decode(errors="replace").splitlines()
    records = []
    for line in lines:
        with contextlib.suppress(json.JSONDecodeError):
            record = json.loads(line)
            if isinstance(record, dict) and record.get("event") == event:
                records.append(record)
    return records


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


@dataclass
class Sample:
    at: dt.datetime
    entries: dict[Key, dt.datetime]


def sample(
    view: AuthView,
    seconds: float,
    every: float = 0.02,
    until: Callable[[list[Sample]], bool] = lambda _samples: False,
) -> list[Sample]:
    """Read the map every ``every`` seconds for ``seconds``, or until ``until(samples)`` holds."""
    samples: list[Sample] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not until(samples):
        samples.append(Sample(now(), view.entries()))
        time.sleep(every)
    return samples


def assert_always_live(samples: list[Sample], keys: set[Key]) -> None:
    for taken in samples:
        for key in keys:
            expires = taken.entries.get(key)
            assert expires is not None, f"{key} missing at {taken.at.isoformat()}"
            assert expires > taken.at, f"{key} expired ({expires.isoformat()}) at {taken.at.isoformat()}"


# ------------------------------------------------------------------------------------------- entries


def test_both_maps_hold_the_expected_entries_before_any_traffic(cluster: DevCluster) -> None:
    with auth_maps(cluster) as views:
        wait_for(
            lambda: all(EXPECTED[n] <= set(views[n].entries()) for n in SPEC.nodes), 20, "the auth entries"
        )
        for node in SPEC.nodes:
            assert set(views[node].entries()) == EXPECTED[node]
        # Each entry expires with the earlier of its two SVIDs. Rotations happen every few seconds, so
        # compare at a moment when dev-spire issued the same SVIDs before and after the maps were read.
        deadline = time.monotonic() + 3 * TTL
        while True:
            before = current_not_after(cluster)
            maps = {node: views[node].entries() for node in SPEC.nodes}
            if current_not_after(cluster) == before:
                wanted = {
                    node: {key: min(before[key[0]], before[key[1]]) for key in EXPECTED[node]}
                    for node in SPEC.nodes
                }
                if maps == wanted or time.monotonic() > deadline:
                    assert maps == wanted
                    break
            time.sleep(0.1)
    for node in SPEC.nodes:
        assert cluster.counters(node).get("denied_auth_required") == 0, (
            "no traffic was dropped: there was none"
        )
    # The first packet of the first connection passes: its SYN was never retransmitted.
    report = cluster.tcp("web", "db", duration=0.2)
    assert report["connected"], report
    assert report["syn_retrans"] == 0, report
    for node in SPEC.nodes:
        assert cluster.counters(node).get("denied_auth_required") == 0


def test_rotation_moves_the_expiry_forward_with_no_gap(cluster: DevCluster) -> None:
    with auth_maps(cluster) as views:
        samples_by_node: dict[str, list[Sample]] = {}

        def watch(node: str) -> None:
            samples_by_node[node] = sample(views[node], 1.6 * TTL)

        threads = [threading.Thread(target=watch, args=(node,)) for node in SPEC.nodes]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    for node, samples in samples_by_node.items():
        assert len(samples) > 100
        assert_always_live(samples, EXPECTED[node])
        for key in EXPECTED[node]:
            expiries = [taken.entries[key] for taken in samples]
            assert expiries == sorted(expiries), f"{key} on {node}: an expiry moved backwards"
            assert len(set(expiries)) >= 3, f"{key} on {node}: expiry moved {len(set(expiries)) - 1} times"


# --------------------------------------------------------------------- the listener of a running node


def _in_netns(node: str, work: Callable[[], object]) -> object:
    return run_in_netns(NETNS_DIR / f"{SPEC.prefix}-{node}", work)


@dataclass
class ListenerProbe:
    """Connections to a listener at ``address``, made from whichever namespace runs :meth:`run`."""

    address: str
    ca: TestCA
    port: int = 4250

    async def tls(self, context: ssl.SSLContext) -> None:
        """A TLS handshake the listener is expected to refuse (its alert or close ends it)."""
        with contextlib.suppress(ssl.SSLError, ConnectionError):
            reader, writer = await asyncio.open_connection(self.address, self.port, ssl=context)
            await asyncio.wait_for(reader.read(100), 3)
            writer.close()

    async def run(self) -> dict[str, object]:
        live = LeafOptions(
            not_before=now() - dt.timedelta(minutes=1), not_after=now() + dt.timedelta(minutes=10)
        )
        bundles = BundleSet.of([self.ca.bundle()])
        stranger = TestCA.create("stranger.org", not_before=now() - dt.timedelta(days=1))
        # Held open while everything else happens: idle, a truncated ClientHello, garbage.
        idle = await asyncio.open_connection(self.address, self.port)
        truncated = await asyncio.open_connection(self.address, self.port)
        truncated[1].write(bytes.fromhex("160301020001"))
        garbage = await asyncio.open_connection(self.address, self.port)
        garbage[1].write(b"GET / HTTP/1.1\r\nHost: node-a\r\n\r\n")
        bare = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        bare.check_hostname = False
        bare.verify_mode = ssl.CERT_NONE
        await self.tls(bare)  # no client certificate
        other_td = stranger.mint("spiffe://stranger.org/authd/node-b", live)
        await self.tls(client_context(other_td, BundleSet.of([stranger.bundle(), self.ca.bundle()])))
        not_a_node = self.ca.mint(SPEC.spiffe_id("web"), live)  # a real SVID of the trust domain
        await self.tls(client_context(not_a_node, bundles))
        # Then the deadline (2 s by default) cuts the held ones: each reaches EOF.
        cut = []
        for reader, writer in (idle, truncated, garbage):
            with contextlib.suppress(ConnectionError):
                await asyncio.wait_for(reader.read(), 5)
            cut.append(reader.at_eof())
            writer.close()
        return {"cut": cut}


def test_the_listener_refuses_and_cuts_what_it_must_while_serving_a_node(cluster: DevCluster) -> None:
    """Probes from node B's namespace against node A's authd, which logs every refusal reason."""
    probe = ListenerProbe(
        str(cluster.network.nodes["node-a"].address), authorities(cluster)[SPEC.trust_domain]
    )
    log = cluster.log_path("node-a")
    offset = log.stat().st_size
    outcome = _in_netns("node-b", lambda: asyncio.run(probe.run()))
    assert isinstance(outcome, dict)
    assert outcome["cut"] == [True, True, True]
    wanted = {"no-client-certificate", "untrusted-certificate", "client-unknown-node", "not-tls", "deadline"}
    wait_for(
        lambda: wanted <= {r["reason"] for r in log_events(log, offset, "channel refused")},
        5,
        "node A to log every refusal reason",
    )
    # The channel between the nodes went on unharmed: node B's entries never lapsed.
    with auth_maps(cluster) as views:
        assert_always_live([Sample(now(), views["node-b"].entries())], EXPECTED["node-b"])


# ---------------------------------------------------------------------------------- a flood from a pod


FLOOD_SECONDS = 30.0


def test_a_flood_from_a_pod_never_reaches_tls_and_costs_no_entry_nor_proof_time(cluster: DevCluster) -> None:
    """2000 connections, 1000 ClientHellos and 1000 handshakes without a certificate from web's namespace,
    a pod, against node A's channel port, again and again for FLOOD_SECONDS. Every one is closed unanswered,
    node B's entries never lapse, and each rotation node A pushes meanwhile (web's and api's SVIDs, TTL
    10 s) moves node B's entry within 50 ms of the new SVID."""
    address = str(cluster.network.nodes["node-a"].address)
    argv = [
        sys.executable,
        "-m",
        "tests.privileged.flood",
        address,
        "4250",
        str(FLOOD_SECONDS),
        sni_for(sid("web")),
    ]
    with watching_svids(cluster, ("web", "api", "db")) as issued, auth_maps(cluster) as views:
        flooder = subprocess.Popen(
            in_netns(cluster.workload("web").netns, argv),
            stdout=subprocess.PIPE,
            text=True,
            cwd=Path(__file__).parents[2],
        )
        try:
            samples = sample(
                views["node-b"], FLOOD_SECONDS + 60, every=0.005, until=lambda _: flooder.poll() is not None
            )
            output, _ = flooder.communicate(timeout=30)
        finally:
            if flooder.poll() is None:
                flooder.kill()
                flooder.wait()
    assert flooder.returncode == 0
    outcome = json.loads(output)
    assert outcome["sent"] >= Flood().total
    assert outcome["refused"] == outcome["sent"]  # every one closed unanswered
    assert_always_live(samples, EXPECTED["node-b"])
    pushes = push_latencies(issued, samples)
    assert len(pushes) >= 4, f"only {len(pushes)} rotations during the flood"
    assert max(pushes) < 0.05, sorted(pushes)  # the p99, with this few


def push_latencies(issued: list[Issued], samples: list[Sample]) -> list[float]:
    """Seconds from each new SVID of web or api (at node A) to node B's entry for it moving to match it.

    An entry expires with the earlier of its two SVIDs; rotations that do not move it are left out.
    """
    latencies = []
    for seen, name, not_after in issued:
        if name == "db":
            continue
        db = [expiry for at, which, expiry in issued if which == "db" and at <= seen]
        key = ("db", name, "node-a")
        before = [taken for taken in samples if taken.at <= seen]
        if not db or not before or key not in before[-1].entries:
            continue
        target = min(not_after, db[-1])
        if before[-1].entries[key] >= target:
            continue  # the entry does not move
        moved = next((t for t in samples if t.at >= seen and t.entries.get(key, seen) >= target), None)
        latencies.append(float("inf") if moved is None else (moved.at - seen).total_seconds())
    return latencies


def test_a_frozen_listener_keeps_its_peers_entries(cluster: DevCluster) -> None:
    """Node B's authd, the side that accepts the channel, stops for 3 s (SIGSTOP) and then catches up: node A
    keeps its entries throughout, and they move forward again once B answers."""
    with auth_maps(cluster) as views:
        before = views["node-a"].entries()
        thawed = threading.Event()

        def renewed(samples: list[Sample]) -> bool:
            return thawed.is_set() and all(samples[-1].entries.get(k, now()) > before[k] for k in before)

        watched: list[Sample] = []
        watcher = threading.Thread(
            target=lambda: watched.extend(sample(views["node-a"], 3 * TTL, until=renewed))
        )
        cluster.signal_authd("node-b", signal.SIGSTOP)
        try:
            watcher.start()
            time.sleep(3)
        finally:
            cluster.signal_authd("node-b", signal.SIGCONT)
        thawed.set()
        watcher.join()
    assert set(before) == EXPECTED["node-a"]
    assert_always_live(watched, EXPECTED["node-a"])
    assert renewed(watched), "node A's entries were not renewed after node B thawed"
    with auth_maps(cluster) as views:
        wait_for(
            lambda: (
                all(at > now() for at in views["node-b"].entries().values())
                and set(views["node-b"].entries()) == EXPECTED["node-b"]
            ),
            5,
            "node B's own entries to be live again",
        )


# ------------------------------------------------------------------- a bundle change, a silent peer

FOREIGN_PORT = 4251
FEDWEB = f"spiffe://{FEDERATED}/ns/demo/sa/fedweb"
CHANNEL_LOST = ("authd_channels_lost_total", "reason")


def _foreign_node_toml(address: str) -> str:
    """Node C, of the federated trust domain, hosting fedweb, which web on node A requires."""
    return (
        f'[[node]]\nname = "node-c"\naddresses = ["{address}"]\n'
        f'spiffe_id = "spiffe://{FEDERATED}/authd/node-c"\nattest_port = {FOREIGN_PORT}\n\n'
        f'[[endpoint]]\nspiffe_id = "{FEDWEB}"\nnode = "node-c"\nprefixes = ["10.231.99.1/32"]\n'
        'selectors = ["unix:uid:3199"]\n\n'
        f'[[policy]]\nsource = "{FEDWEB}"\ndestination = "{SPEC.spiffe_id("web")}"\n'
        'enforce = "ingress"\nencrypt = "none"\n'
    )


def _log_time(record: dict[str, object]) -> dt.datetime:
    return dt.datetime.fromisoformat(str(record["timestamp"]))


@contextlib.contextmanager
def foreign_node(cluster: DevCluster, own: X509Svid | None = None) -> Iterator[ForeignNode]:
    """Node C, running as ``own`` (a fresh node SVID by default) and serving fedweb's SVID, in cluster
    state for as long as the block runs."""
    ttl = dt.timedelta(hours=1)
    node = ForeignNode(
        own or mint_svid(cluster.spire_dir, SpiffeId.parse(f"spiffe://{FEDERATED}/authd/node-c"), ttl),
        [mint_svid(cluster.spire_dir, SpiffeId.parse(FEDWEB), ttl)],
        BundleSet.of([ca.bundle() for ca in authorities(cluster).values()]),
    )
    netns, address = cluster.network.service_address()
    with node.serving(NETNS_DIR / netns, str(address), FOREIGN_PORT):
        cluster.write_cluster_state(cluster.spec, extra=_foreign_node_toml(str(address)))
        try:
            yield node
        finally:
            cluster.write_cluster_state(cluster.spec)
            with auth_maps(cluster) as views:  # node C is gone from node A too before the next test
                entries = views["node-a"].entries
                wait_for(lambda: all(k[2] != "node-c" for k in entries()), 5, "node C's entries to go")


def test_each_hostile_proof_is_refused_by_its_rule_counted_and_restarts_nothing(cluster: DevCluster) -> None:
    """Node C (played by the test) proves fedweb to node A with one hostile SVID after another: leaf keys
    outside the policy (RSA-1024, DSA, P-521), an X.509 v2 leaf, a key of an unknown algorithm, a proof
    signed by another key. Node A refuses each by its rule and counts it, writes no entry, restarts no
    job, and takes the next good proof."""
    key = ("web", "fedweb", "node-c")
    hostile = hostile_svids(authorities(cluster)[FEDERATED], FEDWEB)
    with foreign_node(cluster) as node, auth_maps(cluster) as views:
        wait_for(lambda: key in views["node-a"].entries(), 20, "node A's entry for fedweb at node C")
        good = node.hosted[0]
        for case, (svid, reason, answer) in hostile.items():
            metric = (
                ("authd_attestations_total", "result") if answer else ("authd_channels_lost_total", "reason")
            )
            before = sample_metric(_metrics(cluster), metric[0], **{metric[1]: reason})
            node.host(svid)
            wait_for(
                lambda: sample_metric(_metrics(cluster), metric[0], **{metric[1]: reason}) > before,  # noqa: B023
                10,
                f"node A to count {case} as {reason}",
            )
            if answer:  # refused at once, and so is its entry; a violation keeps it until it expires
                wait_for(
                    lambda: key not in views["node-a"].entries(), 2, f"fedweb's entry to go after {case}"
                )
            node.host(good)  # then a good proof is taken again
            wait_for(lambda: key in views["node-a"].entries(), 10, f"fedweb's entry back after {case}")
        assert_always_live([Sample(now(), views["node-a"].entries())], EXPECTED["node-a"])
    metrics = _metrics(cluster)
    assert "authd_job_restarts_total{" not in metrics, metrics
    cluster.signal_authd("node-a", 0)  # the same process still runs


def test_a_node_svid_outside_the_key_policy_is_refused_before_any_proof(cluster: DevCluster) -> None:
    """Node C presents a node SVID whose key is on P-521, signed by its trust domain's CA: node A refuses
    the server by the leaf key policy, counts it by that rule, and never asks it for a proof."""
    live = LeafOptions(
        not_before=now() - dt.timedelta(minutes=1),
        not_after=now() + dt.timedelta(hours=1),
        key=ec.generate_private_key(ec.SECP521R1()),
    )
    own = authorities(cluster)[FEDERATED].mint(f"spiffe://{FEDERATED}/authd/node-c", live)
    name, label = CHANNEL_LOST
    before = sample_metric(_metrics(cluster), name, **{label: "server-leaf-key-curve"})
    with foreign_node(cluster, own) as node, auth_maps(cluster) as views:
        wait_for(
            lambda: sample_metric(_metrics(cluster), name, **{label: "server-leaf-key-curve"}) > before,
            10,
            "node A to refuse node C's P-521 node SVID",
        )
        assert node.stats.proofs_sent == 0
        assert all(key[2] != "node-c" for key in views["node-a"].entries())


def test_deleting_a_federated_bundle_revokes_a_silent_peers_entries_within_1s(cluster: DevCluster) -> None:
    """Node C, of the federated trust domain (played by the test), proves fedweb to node A and then says
    nothing more. dev-spire deletes the federated bundle (``spire-server bundle delete``) and, like SPIRE,
    goes on sending it on the open bundle stream; node A reopens that stream every second, sees the
    bundle go, and revokes fedweb's entry within 1 s of that. Node C's own node SVID is of that trust
    domain too, so its channel ends as well, and every later dial to it is refused: fail closed."""
    key = ("web", "fedweb", "node-c")
    log = cluster.log_path("node-a")
    with foreign_node(cluster), auth_maps(cluster) as views:
        wait_for(lambda: key in views["node-a"].entries(), 20, "node A's entry for fedweb at node C")
        offset = log.stat().st_size
        deleted = now()
        cluster.delete_federated_bundle(FEDERATED)
        samples = sample(
            views["node-a"], 10, every=0.01, until=lambda s: key not in s[-1].entries if s else False
        )
        assert samples
        assert key not in samples[-1].entries, "fedweb's entry outlived its trust domain"
        gone = samples[-1].at
        assert_always_live(samples, EXPECTED["node-a"])  # the other entries are untouched
        changes = [
            r
            for r in log_events(log, offset, "trust bundles changed")
            if FEDERATED in r["removed"]  # type: ignore[operator]
        ]
        assert len(changes) == 1, "node A did not see the bundle go"
        seen = _log_time(changes[0])
        assert seen - deleted < dt.timedelta(seconds=REOPEN + 1)  # one reopen period, and some
        assert gone - seen < dt.timedelta(seconds=1), f"revoked {gone - seen} after the bundle change"
        revoked = log_events(log, offset, "attestation no longer verifies")
        assert [(r["peer"], r["rule"]) for r in revoked] == [(FEDWEB, "unknown-trust-domain")]
        after = sample(views["node-a"], 2, every=0.05)
        assert all(key not in taken.entries for taken in after)
        ended = [r for r in log_events(log, offset, "channel lost") if r["node"] == "node-c"]
        assert [r["reason"] for r in ended[:1]] == ["peer-unknown-trust-domain"], ended


def _metrics(cluster: DevCluster) -> str:
    code, body = http_get(cluster, "node-a", "/metrics")
    assert code == 200
    return body


def test_removing_an_endpoint_removes_its_entries_on_both_nodes(cluster: DevCluster) -> None:
    without_api = replace(
        cluster.spec,
        workloads=tuple(replace(w, registered=w.name != "api") for w in cluster.spec.workloads),
    )
    with auth_maps(cluster) as views:
        cluster.write_cluster_state(without_api)
        started = time.monotonic()
        wait_for(
            lambda: all(not [k for k in views[n].entries() if "api" in k] for n in SPEC.nodes),
            10,
            "api's entries to go",
        )
        took = time.monotonic() - started
        remaining = {n: set(views[n].entries()) for n in SPEC.nodes}
    assert remaining == {
        "node-a": {("web", "db", "node-b")},
        "node-b": {("db", "web", "node-a")},
    }
    assert took < 3.0  # the file is polled every 200 ms


def test_a_restarted_node_keeps_its_entries_without_a_gap(cluster: DevCluster) -> None:
    """kill -9 at the worst moment (just before the entry's SVID rotates, so the rotation happens while
    the node is down), restart: the entry stays in the map with its old expiry until the new process
    renews it, within a second of READY; and the peer keeps its own entry for the restarted node's
    workload, although the new process answers "not hosted yet" until its SVIDs arrive.

    An entry always has about half its SVID's life left (SPIRE renews at half life), here TTL/2 = 5 s.
    A restart slower than that lets the entry lapse at its expiry, which is fail-closed and right: the
    test then checks that it lapsed no earlier than that expiry, and reports how long the start took."""
    key, peer_key = ("web", "db", "node-b"), ("db", "web", "node-a")
    with auth_maps(cluster) as views:
        wait_for(lambda: key in views["node-a"].entries(), 2 * TTL, "the entry before the restart")
        before = views["node-a"].entries()[key]
        rotation = before - dt.timedelta(seconds=TTL / 2)
        if rotation - now() < dt.timedelta(seconds=0.3):  # too late for this one: wait for the next
            wait_for(lambda: views["node-a"].entries()[key] > before, TTL, "the next rotation")
            before = views["node-a"].entries()[key]
            rotation = before - dt.timedelta(seconds=TTL / 2)
        time.sleep(max(0.0, (rotation - now()).total_seconds() - 0.3))
        restarted = threading.Event()
        ready_at: list[dt.datetime] = []

        def renewed(samples: list[Sample]) -> bool:
            return restarted.is_set() and bool(samples) and samples[-1].entries.get(key, before) > before

        watched: list[Sample] = []
        at_peer: list[Sample] = []
        watchers = [
            threading.Thread(target=lambda: watched.extend(sample(views["node-a"], 2 * TTL, until=renewed))),
            threading.Thread(
                target=lambda: at_peer.extend(
                    sample(views["node-b"], 2 * TTL, until=lambda _: bool(watched))  # node A's is done
                )
            ),
        ]
        for watcher in watchers:
            watcher.start()
        killed = now()
        cluster.stop_authd("node-a", sig=signal.SIGKILL)
        time.sleep(0.5)
        cluster.start_authd("node-a")
        ready_at.append(now())
        restarted.set()
        for watcher in watchers:
            watcher.join()
    ready = ready_at[0]
    took = f"killed {killed.time()}, ready {(ready - killed).total_seconds():.2f} s later"
    assert watched[-1].entries[key] > before, f"the restarted authd did not renew the entry ({took})"
    renewed_at = watched[-1].at
    assert renewed_at - ready < dt.timedelta(seconds=1), f"renewed {renewed_at.time()}, {took}"
    if ready < before:
        assert_always_live(watched[:-1], {key})
    else:  # the start outlasted the entry: it lapsed at its expiry, never before, and was kept in the map
        assert all(taken.entries.get(key) == before for taken in watched[:-1]), took
        assert all(taken.at >= before for taken in watched[:-1] if taken.entries[key] <= taken.at), took
    assert len(at_peer) > 10
    assert_always_live(at_peer, {peer_key})


def test_stopping_a_node_leaves_the_other_nodes_entries_until_they_expire(cluster: DevCluster) -> None:
    key = ("db", "web", "node-a")

    def gone_a_while(samples: list[Sample]) -> bool:
        absent = [taken.at for taken in samples if key not in taken.entries]
        return bool(absent) and now() - absent[0] > dt.timedelta(seconds=1.5)

    with auth_maps(cluster) as views:
        cluster.stop_authd("node-a")
        stopped = now()
        samples = sample(views["node-b"], 1.5 * TTL, every=0.05, until=gone_a_while)
    present = [taken for taken in samples if key in taken.entries]
    gone = [taken for taken in samples if key not in taken.entries]
    assert present, "the entry went with the node's authd"
    assert gone, "the entry outlived its expiry"
    last_expiry = present[-1].entries[key]
    assert last_expiry <= stopped + dt.timedelta(seconds=TTL + 1)
    # Until its expiry: present (and live) at every sample before it...
    assert all(
        key in taken.entries for taken in samples if taken.at < last_expiry - dt.timedelta(seconds=0.1)
    )
    # ...and not longer: gone at every sample from shortly after it.
    assert all(
        key not in taken.entries for taken in samples if taken.at > last_expiry + dt.timedelta(seconds=1)
    )
