"""The BPF datapath: the object's layout mirror, libbpf binding, maps, loader and ring-buffer events.

What the control plane (the auth manager, cluster state) uses is re-exported here; loading, attaching and
the libbpf binding stay in their modules (:mod:`.loader`, :mod:`.enforcement`).
"""

from authd.datapath.events import AuthRequiredEvent, FlowEvent
from authd.datapath.layout import IDENTITY_ANY, IDENTITY_WORLD, NODE_LOCAL, AuthType, Direction
from authd.datapath.maps import AuthKey, AuthMap, IpcacheEntry, IpcacheMap, PinnedMaps, PolicyKey, PolicyMap

__all__ = [
    "IDENTITY_ANY",
    "IDENTITY_WORLD",
    "NODE_LOCAL",
    "AuthKey",
    "AuthMap",
    "AuthRequiredEvent",
    "AuthType",
    "Direction",
    "FlowEvent",
    "IpcacheEntry",
    "IpcacheMap",
    "PinnedMaps",
    "PolicyKey",
    "PolicyMap",
]
