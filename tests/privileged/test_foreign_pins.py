"""Issue 17: a foreign map pinned in authd's place is the one state it cannot recover from by itself.

authd never removes a map it did not make: the load stops, and the error names the pin and says what
removes it.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from authd.datapath.layout import MapName
from authd.datapath.loader import Datapath
from authd.errors import DatapathError
from tests.privileged.conftest import SIZES

pytestmark = pytest.mark.privileged


def test_a_foreign_map_in_a_pin_stops_the_load_naming_the_pin_and_the_remedy(pin_dir: Path) -> None:
    pin_dir.mkdir()
    foreign = pin_dir / MapName.AUTH
    subprocess.run(
        ["bpftool", "map", "create", str(foreign), "type", "hash", "key", "4", "value", "4", "entries", "16",
         "name", "foreign"],
        check=True,
    )  # fmt: skip
    with pytest.raises(DatapathError) as caught:
        Datapath.load(pin_dir, SIZES)
    assert str(foreign) in str(caught.value)
    assert "`authd bpf unload` removes them" in str(caught.value)
    assert foreign.exists()  # left for the operator: authd removes nothing it did not make
