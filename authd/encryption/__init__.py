"""WireGuard between nodes, keyed over the node channel.

Node keys, per-node-pair preshared keys, the peers cluster state implies, and the two backends (kernel
WireGuard over netlink, wireguard-go over its UAPI socket) behind one interface.
"""
