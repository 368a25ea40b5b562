"""Whether this node can carry a pair in kernel TLS, and the fail-closed report on ``encrypt = "ktls"``.

The probe asks the kernel for the TLS upper-layer protocol the way every kTLS user does,
``setsockopt(SOL_TCP, TCP_ULP, "tls")``, on a fresh unconnected TCP socket: the kernel looks the ULP up
(loading ``tls.ko`` if it can) before it checks the socket, so ENOENT means the kernel has no TLS, and
ENOTCONN means it has it (TLS attaches only to established sockets). Any other answer is taken as no TLS,
with the error as the reason: a probe that is not understood never reads as support.

The datapath drops every pair under a kTLS rule whatever this says (see :mod:`authd.ktls`); the gate
makes the reason visible: a ``ktls`` health component (``authd status``, ``/readyz``, the
``authd_component_state`` metric) that is degraded while this node enforces a kTLS rule, a warning in
the log each time that set of rules changes, and :class:`KtlsStats` for the metrics.
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import structlog

from authd.cluster.model import ClusterState
from authd.health import Component

log = structlog.get_logger(__name__)

TCP_ULP = 31
"""``setsockopt(SOL_TCP, TCP_ULP, name)`` attaches an upper-layer protocol (include/uapi/linux/tcp.h)."""


@dataclass(frozen=True, slots=True)
class KernelTls:
    """The probe's answer: whether the kernel has TLS, and in words why (for status and logs)."""

    available: bool
    reason: str


def attach_tls_ulp() -> None:
    """Ask the kernel for the TLS ULP on a fresh unconnected TCP socket; raise the OSError it answers."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, TCP_ULP, b"tls")


def probe(attach: Callable[[], None] = attach_tls_ulp) -> KernelTls:
    """Probe kernel TLS with ``attach`` (the real setsockopt unless a test gives another)."""
    try:
        attach()
    except OSError as err:
        code = err.errno or 0
        name = errno.errorcode.get(code, str(code))
        if code == errno.ENOTCONN:
            return KernelTls(available=True, reason='kernel TLS available (TCP_ULP "tls" found)')
        if code == errno.ENOENT:
            return KernelTls(
                available=False, reason=f'kernel has no TLS (TCP_ULP "tls": {name}; no CONFIG_TLS or tls.ko)'
            )
        return KernelTls(
            available=False, reason=f'kernel TLS unusable (TCP_ULP "tls": {name}: {os.strerror(code)})'
        )
    return KernelTls(available=True, reason='kernel TLS available (TCP_ULP "tls" attached)')


def ktls_rules(state: ClusterState, local_node: str) -> int:
    """How many kTLS rules of ``state`` this node enforces (at a destination's ingress, a source's egress)."""
    local_ids = {endpoint.spiffe_id for endpoint in state.endpoints_on(local_node)}
    return sum(
        1
        for rule in state.rules
        if rule.encrypt == "ktls"
        and any(
            (rule.at_ingress and rule.destination.matches(local))
            or (rule.at_egress and rule.source.matches(local))
            for local in local_ids
        )
    )


@dataclass(slots=True)
class KtlsStats:
    """What the metrics read: the probe's answer and the kTLS rules whose pairs are denied here."""

    kernel_tls: bool = False
    denied_rules: int = 0


class KtlsGate:
    """Reports, from the probe and each cluster-state version, why this node's kTLS pairs are denied."""

    def __init__(self, local_node: str, health: Component, kernel: KernelTls) -> None:
        """``kernel``: the probe's answer, taken once at start (a kernel does not gain TLS while running)."""
        self._local_node = local_node
        self._health = health
        self._kernel = kernel
        self.stats = KtlsStats(kernel_tls=kernel.available)
        if not kernel.available:
            log.warning(
                "kernel TLS unavailable: pairs under encrypt = ktls will be denied", reason=kernel.reason
            )
        self._report()

    @property
    def why_denied(self) -> str:
        """Why a kTLS pair cannot pass here: the kernel's lack of TLS first, else the missing capture."""
        if not self._kernel.available:
            return self._kernel.reason
        return "this authd has no kTLS transparent capture yet"

    def cluster_changed(self, state: ClusterState) -> None:
        """Count the kTLS rules this node enforces; log and report when the count changes."""
        count = ktls_rules(state, self._local_node)
        if count == self.stats.denied_rules:
            return
        self.stats.denied_rules = count
        if count:
            log.warning(
                "pairs under encrypt = ktls are denied, never passed in clear",
                rules=count,
                reason=self.why_denied,
            )
        else:
            log.info("no encrypt = ktls rule applies to this node any more")
        self._report()

    async def follow(self, snapshots: AsyncIterator[ClusterState]) -> None:
        """Apply every cluster-state version from ``snapshots`` (a daemon job)."""
        async for state in snapshots:
            self.cluster_changed(state)

    def _report(self) -> None:
        count = self.stats.denied_rules
        if count:
            self._health.degraded(
                f'{count} encrypt = "ktls" rule(s) enforced here: their pairs are denied: {self.why_denied}'
            )
        else:
            self._health.ready(f"no encrypt = ktls rule applies here; {self._kernel.reason}")
