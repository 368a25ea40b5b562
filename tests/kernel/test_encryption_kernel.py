"""The WireGuard tunnel tests of tests/privileged/test_encryption_tunnel.py, run in the guest, where the
kernel backend has its module: there its cases are required, never skipped. The datapath's fixtures come
along (tests/privileged/conftest.py does not apply here)."""

from __future__ import annotations

from tests.privileged.conftest import datapath, maps, pin_dir, ring
from tests.privileged.test_encryption_tunnel import (
    guarded,
    mesh,
    test_a_cleartext_packet_claiming_a_remote_workload_is_dropped_not_encrypted,
    test_a_flow_into_the_tunnel_is_reported_encrypted_once,
    test_a_node_removed_from_cluster_state_loses_its_peer_at_once,
    test_a_third_node_cannot_send_as_another_nodes_workload,
    test_workload_traffic_crosses_the_underlay_only_encrypted,
)

__all__ = [
    "datapath",
    "guarded",
    "maps",
    "mesh",
    "pin_dir",
    "ring",
    "test_a_cleartext_packet_claiming_a_remote_workload_is_dropped_not_encrypted",
    "test_a_flow_into_the_tunnel_is_reported_encrypted_once",
    "test_a_node_removed_from_cluster_state_loses_its_peer_at_once",
    "test_a_third_node_cannot_send_as_another_nodes_workload",
    "test_workload_traffic_crosses_the_underlay_only_encrypted",
]
