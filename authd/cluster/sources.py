"""The cluster-state source the configuration asks for: the watched file or etcd (``cluster.source``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from authd.backoff import BackoffPolicy
from authd.cluster.file import FileClusterSource
from authd.config.model import ClusterConfig
from authd.health import Component

if TYPE_CHECKING:
    from authd.cluster.etcdsource import EtcdClusterSource


def open_source(
    config: ClusterConfig, local_node: str, health: Component
) -> FileClusterSource | EtcdClusterSource:
    """Build the configured source; it connects or reads once its ``run`` starts."""
    if config.source == "etcd":
        from authd.cluster.etcd import EtcdClient  # noqa: PLC0415 - etcd's client only with etcd
        from authd.cluster.etcdsource import EtcdClusterSource  # noqa: PLC0415

        etcd = config.etcd
        return EtcdClusterSource(
            EtcdClient(etcd),
            etcd.prefix,
            local_node,
            health,
            backoff=BackoffPolicy(
                initial=etcd.retry_initial.total_seconds(), maximum=etcd.retry_max.total_seconds()
            ),
            max_endpoint_removal=config.max_endpoint_removal,
        )
    return FileClusterSource(
        config.file,
        local_node,
        health,
        poll_interval=config.poll_interval.total_seconds(),
        settle=config.settle_time.total_seconds(),
        max_endpoint_removal=config.max_endpoint_removal,
    )
