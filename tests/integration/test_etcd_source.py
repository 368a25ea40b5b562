"""The etcd source against real etcd: snapshot then watch, refusals, compaction, failover, fail static."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import re
import socket
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from structlog.testing import capture_logs

from authd.backoff import BackoffPolicy
from authd.cluster.etcd import EtcdClient
from authd.cluster.etcdcodec import encode_state
from authd.cluster.etcdsource import EtcdClusterSource, items_under
from authd.cluster.file import load_cluster, parse_cluster
from authd.cluster.model import ClusterState
from authd.config.model import EtcdConfig
from authd.health import Health, State
from tests.etcd import EtcdCluster, EtcdTls
from tests.fakes.ca import LeafOptions, TestCA
from tests.waiting import eventually

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = load_cluster(REPO / "config" / "cluster.example.toml")
PREFIX = "/authd/test/"
FAST = BackoffPolicy(initial=0.05, maximum=0.2)
OUTAGE_S = 30


def settings(cluster: EtcdCluster) -> EtcdConfig:
    return dataclasses.replace(EtcdConfig(), endpoints=cluster.endpoints, prefix=PREFIX)


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[EtcdCluster]:
    cluster = EtcdCluster(tmp_path / "etcd")
    try:
        yield cluster.start()
    finally:
        cluster.close()


@pytest.fixture
def etcd3(tmp_path: Path) -> Iterator[EtcdCluster]:
    cluster = EtcdCluster(tmp_path / "etcd", size=3)
    try:
        yield cluster.start()
    finally:
        cluster.close()


async def push(client: EtcdClient, state: ClusterState) -> int:
    revision, _ = await client.replace(PREFIX.encode(), items_under(PREFIX, encode_state(state)))
    return revision


def with_web_at(address: str) -> ClusterState:
    return parse_cluster((REPO / "config" / "cluster.example.toml").read_text().replace("10.1.0.5", address))


class Running:
    """A source following etcd in a task, and the health component it reports to."""

    def __init__(
        self, cluster: EtcdCluster, *, local_node: str = "node-a", config: EtcdConfig | None = None
    ) -> None:
        self.health = Health().register("cluster")
        self.source = EtcdClusterSource(
            EtcdClient(config or settings(cluster)), PREFIX, local_node, self.health, backoff=FAST
        )
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.task = asyncio.create_task(self.source.run())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
            self.task = None

    def at(self, state: ClusterState) -> bool:
        current = self.source.current()
        return current is not None and current.version == state.version


@contextlib.asynccontextmanager
async def following(cluster: EtcdCluster) -> AsyncIterator[Running]:
    running = Running(cluster)
    running.start()
    try:
        yield running
    finally:
        await running.stop()


@contextlib.asynccontextmanager
async def writer(cluster: EtcdCluster) -> AsyncIterator[EtcdClient]:
    client = EtcdClient(settings(cluster))
    try:
        yield client
    finally:
        await client.close()


async def test_snapshot_then_watch(etcd: EtcdCluster) -> None:
    async with writer(etcd) as client:
        first = await push(client, EXAMPLE)
        async with following(etcd) as running:
            await eventually(lambda: running.at(EXAMPLE), within=10)
            assert running.source.revision == first
            assert running.health.status.state is State.READY
            moved = with_web_at("10.1.0.6")
            second = await push(client, moved)
            await eventually(lambda: running.at(moved), within=10)
            assert running.source.revision == second
            stats = running.source.stats
            assert (stats.snapshots, stats.applied) == (1, 2)
            assert stats.changes == 1  # one key changed: the web endpoint's value


async def test_invalid_write_is_refused_and_names_the_key(etcd: EtcdCluster) -> None:
    async with writer(etcd) as client:
        await push(client, EXAMPLE)
        async with following(etcd) as running:
            await eventually(lambda: running.at(EXAMPLE), within=10)
            items = encode_state(EXAMPLE)
            key = next(k for k in items if k.startswith("v1/endpoint/node-b/"))
            items[key] = items[key].replace(b'"node-b"', b'"node-c"')
            with capture_logs() as logs:
                await client.replace(PREFIX.encode(), items_under(PREFIX, items))
                await eventually(lambda: running.source.stats.rejected == 1, within=10)
            assert running.at(EXAMPLE)
            (problem,) = running.source.stats.problems
            assert problem == f'{key} node: unknown node "node-c" (did you mean "node-b"?)', problem
            assert running.health.status.state is State.DEGRADED
            assert any(e["event"] == "cluster state rejected, keeping the last good state" for e in logs)
            moved = with_web_at("10.1.0.7")
            await push(client, moved)  # rewrites the bad key too
            await eventually(lambda: running.at(moved), within=10)
            assert running.source.stats.problems == []


@pytest.mark.parametrize(
    ("kept", "reason"),
    [("nothing", 'it no longer lists this node "node-a"'), ("v1/node/", "it removes every endpoint (2)")],
    ids=["wiped", "nodes-only"],
)
async def test_bad_deploy_is_held_until_accepted(etcd: EtcdCluster, kept: str, reason: str) -> None:
    async with writer(etcd) as client:
        await push(client, EXAMPLE)
        async with following(etcd) as running:
            await eventually(lambda: running.at(EXAMPLE), within=10)
            items = {key: value for key, value in encode_state(EXAMPLE).items() if key.startswith(kept)}
            await client.replace(PREFIX.encode(), items_under(PREFIX, items))
            await eventually(lambda: bool(running.source.stats.held_version), within=10)
            assert running.at(EXAMPLE)
            assert running.source.stats.held_reason == reason
            assert running.health.status.state is State.DEGRADED
            accepted = running.source.accept()
            assert not accepted.endpoints
            assert running.source.current() is accepted
            assert running.source.stats.held_version == ""


async def test_compacted_revision_reads_a_fresh_snapshot(etcd: EtcdCluster) -> None:
    async with writer(etcd) as client:
        await push(client, EXAMPLE)
        running = Running(etcd)
        running.start()
        await eventually(lambda: running.at(EXAMPLE), within=10)
        await running.stop()
        for address in ("10.1.0.8", "10.1.0.9"):
            latest = await push(client, with_web_at(address))
        await client.compact(latest)
        with capture_logs() as logs:
            running.start()
            try:
                await eventually(lambda: running.at(with_web_at("10.1.0.9")), within=10)
            finally:
                await running.stop()
        assert "etcd compacted the revision to resume from, reading a fresh snapshot" in {
            e["event"] for e in logs
        }
        assert running.source.stats.snapshots == 2
        assert running.source.revision == latest


async def test_leader_killed_enforcement_goes_on_and_no_update_is_lost(etcd3: EtcdCluster) -> None:
    async with writer(etcd3) as client:
        await push(client, EXAMPLE)
        async with following(etcd3) as running:
            await eventually(lambda: running.at(EXAMPLE), within=10)
            leader = etcd3.leader()
            assert leader is not None
            etcd3.stop_member(leader)
            assert running.source.current() is not None  # the state in force stays while etcd elects
            await asyncio.to_thread(etcd3.wait_healthy)
            states = [with_web_at(f"10.1.1.{i}") for i in range(1, 6)]
            for state in states:
                await _retrying(lambda s=state: push(client, s))
            await eventually(lambda: running.at(states[-1]), within=15)
            assert running.source.stats.snapshots == 1  # followed the new leader by resuming the watch
            assert running.source.stats.rejected == 0


async def test_all_members_down_keeps_state_then_recovers(etcd3: EtcdCluster) -> None:
    async with writer(etcd3) as client:
        await push(client, EXAMPLE)
        async with following(etcd3) as running:
            await eventually(lambda: running.at(EXAMPLE), within=10)
            for member in etcd3.members:
                etcd3.stop_member(member)
            await eventually(lambda: running.source.stats.out_of_touch_since is not None, within=15)
            down_since = time.monotonic()
            while time.monotonic() - down_since < OUTAGE_S:  # checked all along, not only at the end
                assert running.at(EXAMPLE)
                assert running.health.status.state is State.DEGRADED
                await asyncio.sleep(1)
            outage = running.health.status
            age = re.search(r"out of touch for (\d+)s", outage.reason)
            assert age is not None, outage.reason
            assert int(age.group(1)) >= OUTAGE_S - 1, outage.reason  # as of the last failed retry
            assert f"keeping version {EXAMPLE.version[:12]}" in outage.reason
            assert running.source.stats.read_errors >= 1
            for member in etcd3.members:
                etcd3.start_member(member)
            await asyncio.to_thread(etcd3.wait_healthy)
            moved = with_web_at("10.1.2.1")
            await _retrying(lambda: push(client, moved))
            await eventually(lambda: running.at(moved), within=15)
            assert running.source.stats.out_of_touch_since is None
            assert running.health.status.state is State.READY
            assert running.source.stats.snapshots == 1  # resumed from its revision, no fresh snapshot


async def _retrying(write: object) -> None:
    """A writer's own retry while a new leader settles (authd's source needs none of this)."""
    from authd.errors import EtcdError  # noqa: PLC0415

    for _ in range(50):
        try:
            await write()  # type: ignore[operator]
        except EtcdError:
            await asyncio.sleep(0.1)
        else:
            return
    raise AssertionError("etcd did not accept the write")


def tls_files(directory: Path) -> EtcdTls:
    """A CA, a server pair for 127.0.0.1 and a node SVID as the client pair (as spiffe-helper writes it)."""
    now = datetime.now(UTC)
    ca = TestCA.create("example.org", not_before=now - timedelta(days=1), not_after=now + timedelta(days=1))
    start, end = now - timedelta(minutes=1), now + timedelta(hours=1)
    at_loopback = x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    server = ca.mint(
        "", LeafOptions(uris=(), extensions=((at_loopback, False),), not_before=start, not_after=end)
    )
    node_svid = ca.mint("spiffe://example.org/authd/node-a", LeafOptions(not_before=start, not_after=end))
    directory.mkdir(parents=True)
    files = EtcdTls(
        *(directory / name for name in ("ca.pem", "etcd.pem", "etcd.key", "svid.pem", "svid.key"))
    )
    files.ca_file.write_bytes(ca.cert.public_bytes(serialization.Encoding.PEM))
    for svid, cert, key in (
        (server, files.cert_file, files.key_file),
        (node_svid, files.client_cert_file, files.client_key_file),
    ):
        cert.write_bytes(svid.chain_pem())
        key.write_bytes(
            svid.private_key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
    return files


async def test_tls_with_the_node_svid_as_client_certificate(tmp_path: Path) -> None:
    tls = tls_files(tmp_path / "tls")
    etcd = EtcdCluster(tmp_path / "etcd", tls=tls)
    try:
        etcd.start()
        assert etcd.endpoints[0].startswith("https://")
        with_svid = dataclasses.replace(
            settings(etcd), ca_file=tls.ca_file, cert_file=tls.client_cert_file, key_file=tls.client_key_file
        )
        client = EtcdClient(with_svid)
        try:
            await push(client, EXAMPLE)
        finally:
            await client.close()
        trusted = Running(etcd, config=with_svid)
        anonymous = Running(etcd, config=dataclasses.replace(with_svid, cert_file=None, key_file=None))
        trusted.start()
        anonymous.start()
        try:
            await eventually(lambda: trusted.at(EXAMPLE), within=10)
            await eventually(lambda: anonymous.source.stats.read_errors >= 1, within=10)
            assert anonymous.source.current() is None  # no client certificate: etcd refuses, nothing read
            assert anonymous.health.status.state is State.DEGRADED
            assert "cannot read cluster state" in anonymous.health.status.reason
        finally:
            await trusted.stop()
            await anonymous.stop()
    finally:
        etcd.close()


async def test_a_member_that_never_answers_costs_one_dial_timeout(tmp_path: Path) -> None:
    tls = tls_files(tmp_path / "tls")
    etcd = EtcdCluster(tmp_path / "etcd", tls=tls)
    with socket.socket() as silent:  # the kernel completes TCP handshakes; nothing ever answers TLS
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        try:
            etcd.start()
            config = dataclasses.replace(
                settings(etcd),
                endpoints=(f"https://127.0.0.1:{silent.getsockname()[1]}", etcd.endpoints[0]),
                ca_file=tls.ca_file,
                cert_file=tls.client_cert_file,
                key_file=tls.client_key_file,
                dial_timeout=timedelta(milliseconds=500),
                request_timeout=timedelta(seconds=60),
            )
            client = EtcdClient(dataclasses.replace(config, endpoints=etcd.endpoints))
            try:
                await push(client, EXAMPLE)
            finally:
                await client.close()
            running = Running(etcd, config=config)
            started = time.monotonic()
            running.start()
            try:
                await eventually(lambda: running.at(EXAMPLE), within=10)
            finally:
                await running.stop()
            assert time.monotonic() - started < 5  # gRPC's own connect deadline is 20 s
            assert running.source.stats.read_errors == 1
        finally:
            etcd.close()
