"""Cluster state: what nodes, workloads and policy exist, where it comes from, and what it means here.

``model`` (the snapshot and identity patterns) · ``validation`` (cross-checks) · ``source`` (the interface
consumers use) · ``file`` (the watched TOML file) · ``handles`` (node-local integers for the BPF maps) ·
``desired`` (the datapath state this node should have).
"""
