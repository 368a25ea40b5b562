"""Test-suite wide policy: privileged tests run as root, and never skip silently in CI."""

from __future__ import annotations

import os

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip tests marked ``privileged`` unless root; in CI (AUTHD_REQUIRE_PRIVILEGED=1) refuse to run."""
    del config
    if os.geteuid() == 0:
        return
    privileged = [item for item in items if item.get_closest_marker("privileged") is not None]
    if privileged and os.environ.get("AUTHD_REQUIRE_PRIVILEGED") == "1":
        raise pytest.UsageError(f"{len(privileged)} privileged tests need root, and CI requires them")
    for item in privileged:
        item.add_marker(pytest.mark.skip(reason="needs root (network namespaces, BPF)"))
