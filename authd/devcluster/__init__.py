"""A whole authd cluster on one machine, for the end-to-end tests, ``make demo`` and ``make bench``.

Network namespaces stand in for nodes and pods, ``authd dev-spire`` for SPIRE, and one ``authd run`` per
node runs inside its node's namespace with its own config, bpffs pins and attestation listener.

- ``cluster``: :class:`~authd.devcluster.cluster.DevCluster`, the context manager that builds and tears
  down everything, and what tests drive (traffic, SPIRE and authd restarts, readings of the maps);
- ``network``: node and workload namespaces, links, addresses and routes (IPv4, optionally dual stack);
- ``netns``: namespaces and processes, each remembered for teardown;
- ``leftovers``: what a crashed run left behind, and the sweep that removes it;
- ``interrupts``: SIGTERM like Ctrl-C, and teardowns that signals cannot cut short;
- ``traffic``: the workloads' echo servers and clients (run under the workloads' uids);
- ``readings``: authd's JSON logs and observe flows, read back;
- ``demo`` and ``narration``: ``make demo``.
"""
