"""One cluster per test module, built from the module's ``SPEC``; its logs are attached to failures.

Building a cluster takes a few seconds, so each module shares one and its tests leave it as they found
it (or run last). Every module names its cluster with the ``ae2`` prefix: the harness refuses to start
while another live process owns a cluster of that name, and sweeps what a crashed run left.
"""

from __future__ import annotations

from collections.abc import Generator, Iterator

import pytest

from authd.devcluster import readings
from authd.devcluster.cluster import ClusterSpec, DevCluster


@pytest.fixture(scope="module")
def cluster(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevCluster]:
    """The module's cluster: ``SPEC`` in the test module says what to build."""
    spec = request.module.SPEC
    assert isinstance(spec, ClusterSpec)
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
