"""A whole authd cluster on one machine, for the end-to-end tests and ``make demo``.

Network namespaces stand in for nodes and pods, ``authd dev-spire`` for SPIRE, and one ``authd run`` per
node runs inside its node's namespace with its own config, bpffs pins and attestation listener.
"""
