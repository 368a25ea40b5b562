"""authd's side of SPIRE: clients for the agent's and server's gRPC APIs, and the dev stand-in.

* :mod:`authd.spire.endpoint`: where an API is reached (Unix socket or TCP) and the gRPC channel to it.
* :mod:`authd.spire.stream`: following a server stream across reconnects; the one place that decides
  which failures are retried.
* :mod:`authd.spire.workload`: the Workload API, authd's own X509-SVID and bundles.
* :mod:`authd.spire.delegated`: the agent's Delegated Identity API, the SVIDs of local workloads by their
  selectors and every trust bundle the agent tracks.
* :mod:`authd.spire.entries`: the server's Entry API (list, batch create, batch delete).
* :mod:`authd.spire.agent`: the three streams above wired to the SVID store and to health.
* :mod:`authd.spire.dev`: ``authd dev-spire``, a SPIRE server plus agents speaking the same APIs.

Protobuf modules are generated into ``authd.spire._proto`` by ``make artifacts``. The Workload API proto
has no package, exactly like SPIRE's, so its message names are global in protobuf's descriptor pool:
authd never imports py-spiffe, whose copy of the same file would collide with ours.
"""
