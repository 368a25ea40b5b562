"""Attestation between nodes: proving, with a TLS 1.3 handshake, that a node really hosts an identity.

The listener (:mod:`authd.attest.listener`) serves the SVID of a local workload chosen by SNI to other
nodes' authd, which must present a node SVID of a node in cluster state. The client
(:mod:`authd.attest.client`) asks a remote node for one identity and verifies what it presents.
"""
