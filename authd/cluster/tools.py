"""Operator tools over either source: read the configured state, push a file into etcd, diff, export.

Used by ``authd cluster check|push|export`` and ``authd spire sync``; the CLI only parses arguments.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from authd.cluster.etcd import EtcdClient
from authd.cluster.etcdcodec import VERSION, decode_state, encode_state
from authd.cluster.file import load_cluster
from authd.cluster.model import ClusterState
from authd.config.model import ClusterConfig, EtcdConfig
from authd.errors import ConfigError


def describe(config: ClusterConfig) -> str:
    """Where the configured source reads, for messages."""
    if config.source == "etcd":
        return f"etcd {config.etcd.prefix} at {', '.join(config.etcd.endpoints)}"
    return str(config.file)


async def load_configured(config: ClusterConfig) -> ClusterState:
    """The state the configured source holds now: the file, or etcd's keys (ClusterStateError if invalid)."""
    if config.source == "etcd":
        return (await read_etcd(config.etcd))[1]
    return load_cluster(config.file)


async def read_etcd(config: EtcdConfig) -> tuple[int, ClusterState]:
    """The cluster state in etcd and the revision it was read at."""
    client = EtcdClient(config)
    try:
        revision, items = await client.snapshot(config.prefix.encode())
    finally:
        await client.close()
    relative = {key[len(config.prefix) :].decode(): value for key, value in items.items()}
    return revision, decode_state(relative, origin=f"etcd {config.prefix}")


@dataclass(slots=True)
class PushPlan:
    """What a push changes, key by key (relative to the prefix), and the revision it was written at."""

    added: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    revision: int = 0


async def push(config: ClusterConfig, path: Path, *, dry_run: bool) -> PushPlan:
    """Load the cluster file at ``path`` (refused if invalid) into etcd as one transaction."""
    if config.source != "etcd":
        raise ConfigError(['cluster.source: must be "etcd" to push cluster state, got "file"'])
    state = load_cluster(path)
    wanted = encode_state(state)
    prefix = config.etcd.prefix
    # Keys of other encoding versions next to ours are left alone (see authd.cluster.etcdcodec).
    ours = (prefix + VERSION).encode()
    client = EtcdClient(config.etcd)
    try:
        revision, items = await client.snapshot(ours)
        current = {key[len(prefix) :].decode(): value for key, value in items.items()}
        plan = PushPlan(
            added=sorted(wanted.keys() - current.keys()),
            changed=sorted(k for k in wanted.keys() & current.keys() if wanted[k] != current[k]),
            removed=sorted(current.keys() - wanted.keys()),
            revision=revision,
        )
        if not dry_run:
            full = {(prefix + key).encode(): value for key, value in wanted.items()}
            plan.revision, _ = await client.replace(ours, full)
    finally:
        await client.close()
    return plan
