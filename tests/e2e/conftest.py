"""One cluster per test module, built from the module's ``SPEC``; its logs are attached to failures.

A module with ``EVERY_SETUP = True`` runs three times: with workloads attached by the harness (the
routed-CNI layout), with pods made through CNI (``ptp``, ``host-local`` with a range per family,
``authd-cni``; ``ClusterSpec(cni=True)``, dual stack when the module's spec is), and with cluster state
in etcd (``ClusterSpec(source="etcd")``, loaded with ``authd cluster push``).

Building a cluster takes a few seconds, so each module shares one and its tests leave it as they found
it (or run last). Every module names its cluster with the ``ae2`` prefix: the harness refuses to start
while another live process owns a cluster of that name, and sweeps what a crashed run left.
"""

from __future__ import annotations

from collections.abc import Generator, Iterator
from dataclasses import replace

import pytest

from authd.devcluster import readings
from authd.devcluster.cluster import ClusterSpec, DevCluster


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Build the clusters of ``EVERY_SETUP`` modules all three ways."""
    if "cluster" in metafunc.fixturenames and getattr(metafunc.module, "EVERY_SETUP", False):
        metafunc.parametrize("cluster", ["veth", "cni", "etcd"], indirect=True, scope="module")


@pytest.fixture(scope="module")
def cluster(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevCluster]:
    """The module's cluster: ``SPEC`` in the test module says what to build."""
    spec = request.module.SPEC
    assert isinstance(spec, ClusterSpec)
    way = getattr(request, "param", "veth")
    if way == "cni":
        spec = replace(spec, cni=True)
    elif way == "etcd":
        spec = replace(spec, source="etcd")
    logs = tmp_path_factory.mktemp(f"{request.module.__name__.rsplit('.', 1)[-1]}-logs")
    with DevCluster(spec, keep_logs=logs) as built:
        yield built


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """On failure, attach the warnings and errors of every authd and of dev-spire to the report."""
    report = yield
    cluster = getattr(item, "funcargs", {}).get("cluster")
    if report.failed and call.when == "call" and isinstance(cluster, DevCluster):
        logs = cluster.workdir / "logs"
        for path in sorted([*logs.glob("authd-*.log"), logs / "dev-spire.log"]):
            lines = readings.tail(path)
            if lines:
                report.sections.append((f"{path.name} (warnings and errors)", "\n".join(lines)))
    return report
