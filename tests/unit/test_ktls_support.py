from __future__ import annotations

import errno
import socket
from collections.abc import AsyncIterator

import pytest
import structlog

from authd.cluster.model import ClusterState
from authd.health import Health, State
from authd.ktls.support import TCP_ULP, KernelTls, KtlsGate, ktls_rules, probe
from tests.fakes.cluster import endpoint, node, rule, state


def answers(code: int | None) -> KernelTls:
    def attach() -> None:
        if code is not None:
            raise OSError(code, "from the fake kernel")

    return probe(attach)


def test_enoent_means_no_kernel_tls() -> None:
    found = answers(errno.ENOENT)
    assert not found.available
    assert found.reason == 'kernel has no TLS (TCP_ULP "tls": ENOENT; no CONFIG_TLS or tls.ko)'


def test_enotconn_means_the_ulp_exists() -> None:
    # TLS attaches only to established sockets: the kernel found the ULP, then refused the fresh socket.
    assert answers(errno.ENOTCONN).available
    assert answers(None).available


@pytest.mark.parametrize("code", [errno.EPERM, errno.EINVAL, errno.EOPNOTSUPP])
def test_any_other_answer_is_no_tls(code: int) -> None:
    found = answers(code)
    assert not found.available
    assert errno.errorcode[code] in found.reason


def established_socket_takes_tls() -> bool:
    """The same question on a connected loopback socket, where TLS can attach."""
    with (
        socket.create_server(("127.0.0.1", 0)) as server,
        socket.create_connection(server.getsockname()) as client,
        server.accept()[0],
    ):
        try:
            client.setsockopt(socket.IPPROTO_TCP, TCP_ULP, b"tls")
        except FileNotFoundError:
            return False
        return True


def test_the_probe_agrees_with_an_established_socket() -> None:
    assert probe().available is established_socket_takes_tls()


def cluster(*rules: object) -> ClusterState:
    return state(
        [node("node-a"), node("node-b")],
        [endpoint("db", "node-a", "10.1.0.1"), endpoint("web", "node-b", "10.2.0.1")],
        rules,  # type: ignore[arg-type]
    )


KTLS_RULE = rule("spiffe://example.org/web", "spiffe://example.org/db", "ingress", "ktls")


def test_rules_count_where_they_are_enforced() -> None:
    both = rule("spiffe://example.org/web", "spiffe://example.org/db", "both", "ktls")
    plain = rule("spiffe://example.org/web", "spiffe://example.org/db")
    assert ktls_rules(cluster(KTLS_RULE, plain), "node-a") == 1  # at db's ingress
    assert ktls_rules(cluster(KTLS_RULE), "node-b") == 0  # web's node enforces no ingress rule of db's
    assert ktls_rules(cluster(both), "node-b") == 1
    assert ktls_rules(cluster(plain), "node-a") == 0


NO_TLS = KernelTls(available=False, reason='kernel has no TLS (TCP_ULP "tls": ENOENT)')


def test_the_gate_says_why_pairs_are_denied() -> None:
    health = Health()
    gate = KtlsGate("node-a", health.register("ktls", gates_ready=False), NO_TLS)
    (status,) = health.snapshot()
    assert status.state is State.READY
    assert status.reason == 'no encrypt = ktls rule applies here; kernel has no TLS (TCP_ULP "tls": ENOENT)'
    with structlog.testing.capture_logs() as logs:
        gate.cluster_changed(cluster(KTLS_RULE))
        gate.cluster_changed(cluster(KTLS_RULE))  # the same count: logged once
    (status,) = health.snapshot()
    assert status.state is State.DEGRADED
    assert status.reason == (
        '1 encrypt = "ktls" rule(s) enforced here: their pairs are denied: '
        'kernel has no TLS (TCP_ULP "tls": ENOENT)'
    )
    assert [(e["event"], e["rules"], e["reason"]) for e in logs] == [
        ("pairs under encrypt = ktls are denied, never passed in clear", 1, NO_TLS.reason)
    ]
    assert (gate.stats.kernel_tls, gate.stats.denied_rules) == (False, 1)
    gate.cluster_changed(cluster())
    assert health.snapshot()[0].state is State.READY
    assert gate.stats.denied_rules == 0


def test_with_kernel_tls_the_missing_capture_is_the_reason() -> None:
    health = Health()
    kernel = KernelTls(available=True, reason='kernel TLS available (TCP_ULP "tls" found)')
    gate = KtlsGate("node-a", health.register("ktls", gates_ready=False), kernel)
    gate.cluster_changed(cluster(KTLS_RULE))
    assert health.snapshot()[0].reason.endswith(
        "their pairs are denied: this authd has no kTLS transparent capture yet"
    )


def test_an_absent_kernel_is_logged_at_start() -> None:
    with structlog.testing.capture_logs() as logs:
        KtlsGate("node-a", Health().register("ktls"), NO_TLS)
    assert [(e["event"], e["reason"]) for e in logs] == [
        ("kernel TLS unavailable: pairs under encrypt = ktls will be denied", NO_TLS.reason)
    ]


async def test_the_gate_follows_cluster_state() -> None:
    health = Health()
    gate = KtlsGate("node-a", health.register("ktls"), NO_TLS)

    async def versions() -> AsyncIterator[ClusterState]:
        yield cluster()
        yield cluster(KTLS_RULE)

    await gate.follow(versions())
    assert gate.stats.denied_rules == 1
