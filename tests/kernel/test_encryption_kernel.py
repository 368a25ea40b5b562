"""The WireGuard tunnel tests of tests/privileged/test_encryption_tunnel.py, run in the guest, where the
kernel backend has its module: there its cases are required, never skipped."""

from __future__ import annotations

from tests.privileged.test_encryption_tunnel import (
    mesh,
    test_a_node_removed_from_cluster_state_loses_its_peer_at_once,
    test_a_third_node_cannot_send_as_another_nodes_workload,
    test_workload_traffic_crosses_the_underlay_only_encrypted,
)

__all__ = [
    "mesh",
    "test_a_node_removed_from_cluster_state_loses_its_peer_at_once",
    "test_a_third_node_cannot_send_as_another_nodes_workload",
    "test_workload_traffic_crosses_the_underlay_only_encrypted",
]
