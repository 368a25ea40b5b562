"""Test-suite wide policy: privileged tests run as root, and never skip silently in CI."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

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


def _netns() -> set[str]:
    root = Path("/run/netns")
    return {entry.name for entry in root.iterdir()} if root.is_dir() else set()


# Files the kernel itself creates in every bpffs mount (iterators of its own maps and programs): mounting
# bpffs during the run makes them appear, and no test can remove them.
KERNEL_BPFFS_FILES = frozenset({"maps.debug", "progs.debug"})


def _pins() -> set[str]:
    root = Path("/sys/fs/bpf")
    try:
        return {entry.name for entry in root.iterdir()} - KERNEL_BPFFS_FILES
    except OSError:
        return set()


@pytest.fixture(autouse=True, scope="session")
def _leaves_nothing_behind() -> Iterator[None]:
    """Fail the run if tests left network namespaces or bpffs pins behind (they must clean up)."""
    netns, pins = _netns(), _pins()
    yield
    left_netns, left_pins = sorted(_netns() - netns), sorted(_pins() - pins)
    assert not left_netns, f"tests left network namespaces behind: {left_netns}"
    assert not left_pins, f"tests left bpffs pins behind under /sys/fs/bpf: {left_pins}"
