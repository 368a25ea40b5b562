"""Where authd's verdict vocabulary meets Hubble's and Cilium's: drop reasons and policy match types.

One row per authd drop reason (``enum authd_drop_reason``, by name): the ``flow.DropReason`` that Hubble
and Cilium report for the same cause, and Cilium's text for it (what ``hubble observe`` prints for a drop
and what ``cilium_drop_count_total{reason=...}`` carries). Adding a reason is one row. Rows for names
the datapath does not have yet are provisional: they take effect when the enum gains the name.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from authd.datapath.layout import PolicyMatch
from authd.hubble._proto import flow_pb2


@dataclass(frozen=True, slots=True)
class HubbleDrop:
    """How Hubble names one cause of a drop."""

    reason: flow_pb2.DropReason.ValueType
    text: str

    @property
    def name(self) -> str:
        """The ``flow.DropReason`` name, e.g. ``AUTH_REQUIRED`` (also the metrics' ``reason`` label)."""
        return flow_pb2.DropReason.Name(self.reason)


DROP_REASONS: Mapping[str, HubbleDrop] = MappingProxyType(
    {
        "AUTH_REQUIRED": HubbleDrop(flow_pb2.AUTH_REQUIRED, "Authentication required"),
        # Cilium too drops a pair whose auth entry expired as AUTH_REQUIRED: expired is missing.
        "AUTH_EXPIRED": HubbleDrop(flow_pb2.AUTH_REQUIRED, "Authentication required"),
        "MALFORMED": HubbleDrop(flow_pb2.INVALID_PACKET_DROPPED, "Invalid packet"),
        # A VLAN stack deeper than the parser follows is MALFORMED; an unknown ethertype is UNSUPPORTED.
        "UNSUPPORTED": HubbleDrop(flow_pb2.UNSUPPORTED_L3_PROTOCOL, "Unsupported L3 protocol"),
        # Spoofed sources: from a workload that does not own the address, or a local endpoint's address
        # arriving through another interface (the underlay, a neighbour pod).
        "SOURCE_NOT_OWNED": HubbleDrop(flow_pb2.INVALID_SOURCE_IP, "Invalid source ip"),
        "SOURCE_WRONG_INTERFACE": HubbleDrop(flow_pb2.INVALID_SOURCE_IP, "Invalid source ip"),
        # Delivered to a workload that does not own the destination (its link-local address, another
        # endpoint's address): no policy can allow it.
        "DESTINATION_NOT_OWNED": HubbleDrop(flow_pb2.POLICY_DENIED, "Policy denied"),
        # A workload that sends router advertisements or redirects claims to be a router: refused.
        "ROUTER_MESSAGE": HubbleDrop(flow_pb2.POLICY_DENIED, "Policy denied"),
        # Policy asks for kTLS and this node cannot carry the pair in it: refused rather than sent in clear.
        "ENCRYPTION_UNAVAILABLE": HubbleDrop(flow_pb2.UNENCRYPTED_TRAFFIC, "Traffic is unencrypted"),
        # A remote workload's packet that did not come through the WireGuard tunnel: the drop Cilium's
        # WireGuard strict mode reports for traffic that should have been decrypted and was not.
        "NOT_ENCRYPTED": HubbleDrop(flow_pb2.UNENCRYPTED_TRAFFIC, "Traffic is unencrypted"),
    }
)

DROP_TEXT: Mapping[int, str] = MappingProxyType(
    {drop.reason: drop.text for drop in reversed(list(DROP_REASONS.values()))}
)
"""Cilium's text for a ``flow.DropReason`` number (the first row naming it wins)."""

# Hubble's policy match types (``policy_match_type``) and how its printer names them. authd's policy is
# keyed by identity pairs only, never ports or protocols: a matching entry is an L3-only match.
POLICY_MATCH: Mapping[PolicyMatch, int] = MappingProxyType(
    {PolicyMatch.NONE: 0, PolicyMatch.EXEMPT: 1, PolicyMatch.AUTH: 1}
)
POLICY_MATCH_TEXT: Mapping[int, str] = MappingProxyType(
    {0: "none", 1: "L3-Only", 2: "L3-L4", 3: "L4-Only", 4: "all", 5: "L3-Proto", 6: "Proto-Only"}
)

# Cilium monitor message types, as Hubble's ``event_type.type``.
MESSAGE_TYPE_DROP = 1
MESSAGE_TYPE_POLICY_VERDICT = 5

# Cilium's reserved identities that authd uses, and how Hubble prints reserved identities.
IDENTITY_WORLD = 2
RESERVED_IDENTITY_TEXT: Mapping[int, str] = MappingProxyType({0: "unknown", IDENTITY_WORLD: "world"})
FIRST_NUMBERED_IDENTITY = 256
