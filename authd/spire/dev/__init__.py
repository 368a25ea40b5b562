"""``authd dev-spire``: the SPIRE stand-in for tests and demos (SPIRE's binaries cannot run here).

One process models a SPIRE server with one agent per node and speaks SPIRE's gRPC APIs over the same
kind of Unix sockets: the Workload API and the Delegated Identity API per node, the Entry API subset on
the server socket. Real CA (ECDSA P-256, SPIRE's certificate profiles and rotation schedule), SVID
rotation at half-life, unix workload attestation from socket peer credentials, SPIRE's status codes and
messages. Modules: :mod:`.service` (composition, sync loop), :mod:`.ca`, :mod:`.agent` (per-node SVID
cache), :mod:`.registry` (entries), :mod:`.attestor`, :mod:`.state` (persistence), and one module per API.
"""
