"""What the end-to-end tests assert about connections and the flows authd reported for them."""

from __future__ import annotations

from typing import Any

from authd.devcluster import readings
from authd.devcluster.cluster import DevCluster


def assert_lossless(report: dict[str, Any]) -> None:
    """The connection came up at the first SYN and no segment of it was ever resent."""
    assert report["connected"], report
    assert "error" not in report, report
    assert report["syn_retrans"] == 0, f"the first SYN was dropped: {report}"
    assert report["sent"] > 0, report
    assert report["echoed"] == report["sent"], report
    assert report["total_retrans"] == 0, f"segments were dropped and resent: {report}"


def connection_flows(
    cluster: DevCluster,
    node: str,
    client: str,
    report: dict[str, Any],
    within: float = 10.0,
    family: int = 4,
) -> list[dict[str, Any]]:
    """The flows ``node`` reported for exactly this connection (client address and port), once any came.

    Flow events reach authd through a ring buffer, a moment after the packet; this waits for the first.
    """
    address = cluster.address(client, family)
    found: list[dict[str, Any]] = []

    def reported() -> bool:
        found[:] = readings.from_source(cluster.flows(node), address, report["local_port"])
        return bool(found)

    cluster.wait_for(reported, within, f"{node}'s flows from {client}:{report['local_port']}")
    return found


def denied(cluster: DevCluster, node: str) -> int:
    """Packets the node's datapath has denied so far, every reason together."""
    return readings.denied(cluster.counters(node))
