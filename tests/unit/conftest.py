from __future__ import annotations

import shutil

import pytest


@pytest.fixture
def promtool() -> str:
    """Prometheus's promtool, from Debian's prometheus package."""
    path = shutil.which("promtool")
    assert path, "promtool is missing: `make system-deps` installs Debian's prometheus package"
    return path
