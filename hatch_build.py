"""Build hook: generated artifacts (protobuf modules, the BPF object) are built by ``make artifacts``.

So ``pip install .`` and ``pip wheel .`` from a clean checkout carry them, exactly as ``make`` builds them.
"""

from __future__ import annotations

import subprocess
import sys
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface


class ArtifactsBuildHook(BuildHookInterface):  # type: ignore[type-arg]
    """Runs ``make artifacts`` with the build environment's Python before files are collected."""

    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        """Build the generated files in the source tree."""
        del version, build_data
        subprocess.run(  # noqa: S603 - fixed command in our own source tree
            ["make", "--no-print-directory", "-C", self.root, "artifacts", f"PYTHON={sys.executable}"],  # noqa: S607
            check=True,
        )
