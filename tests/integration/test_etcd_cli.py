"""`authd cluster push|export|check` and `authd spire sync --dry-run` against a real etcd."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from authd.cluster.file import load_cluster, parse_cluster
from tests.etcd import EtcdCluster

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "config" / "cluster.example.toml"


@pytest.fixture
def config(tmp_path: Path) -> Iterator[Path]:
    cluster = EtcdCluster(tmp_path / "etcd")
    try:
        cluster.start()
        path = tmp_path / "authd.toml"
        path.write_text(
            f'[node]\nname = "node-a"\n[cluster]\nsource = "etcd"\n'
            f'[cluster.etcd]\nendpoints = ["{cluster.endpoints[0]}"]\nprefix = "/test/"\n'
        )
        yield path
    finally:
        cluster.close()


def authd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "authd", *args], capture_output=True, text=True, timeout=60, check=False
    )


def test_push_export_round_trips_the_example(config: Path, tmp_path: Path) -> None:
    dry = authd("cluster", "push", "--config", str(config), "--dry-run", str(EXAMPLE))
    assert dry.returncode == 0, dry.stderr
    assert "would add /test/v1/node/node-a" in dry.stdout
    assert dry.stdout.endswith("6 to add, 0 to change, 0 to remove (against revision 1)\n")

    pushed = authd("cluster", "push", "--config", str(config), str(EXAMPLE))
    assert pushed.returncode == 0, pushed.stderr
    assert "6 to add, 0 to change, 0 to remove (at revision" in pushed.stdout

    exported = authd("cluster", "export", "--config", str(config))
    assert exported.returncode == 0, exported.stderr
    assert parse_cluster(exported.stdout).version == load_cluster(EXAMPLE).version
    copy = tmp_path / "exported.toml"
    copy.write_text(exported.stdout)
    again = authd("cluster", "push", "--config", str(config), str(copy))
    assert "0 to add, 0 to change, 0 to remove" in again.stdout  # nothing written: same keys and values
    assert authd("cluster", "export", "--config", str(config)).stdout == exported.stdout

    checked = authd("cluster", "check", "--config", str(config))
    assert checked.returncode == 0, checked.stderr
    assert checked.stdout.startswith("# etcd /test/ at http://127.0.0.1:")
    assert 'node "node-a": 1 local identities' in checked.stdout


def test_push_refuses_an_invalid_file_and_writes_nothing(config: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(EXAMPLE.read_text().replace('node = "node-b"', 'node = "node-c"'))
    refused = authd("cluster", "push", "--config", str(config), str(bad))
    assert refused.returncode == 1
    assert 'endpoint[1].node: unknown node "node-c"' in refused.stderr
    dry = authd("cluster", "push", "--config", str(config), "--dry-run", str(EXAMPLE))
    assert "6 to add" in dry.stdout  # etcd is still empty


def test_push_dry_run_shows_the_diff(config: Path, tmp_path: Path) -> None:
    assert authd("cluster", "push", "--config", str(config), str(EXAMPLE)).returncode == 0
    moved = tmp_path / "moved.toml"
    moved.write_text(EXAMPLE.read_text().replace("10.1.0.5", "10.1.0.6"))
    dry = authd("cluster", "push", "--config", str(config), "--dry-run", str(moved))
    assert dry.returncode == 0, dry.stderr
    changed = [line for line in dry.stdout.splitlines() if line.startswith("would change")]
    assert changed == [
        "would change /test/v1/endpoint/node-a/spiffe%3A%2F%2Fexample.org%2Fns%2Fshop%2Fsa%2Fweb"
    ]
    assert dry.stdout.endswith("0 to add, 1 to change, 0 to remove (against revision 2)\n")
