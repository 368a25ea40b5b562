from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "config" / "cluster.example.toml"


def authd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "authd", *args], capture_output=True, text=True, timeout=60, check=False
    )


def test_cluster_check_summarises_a_valid_file_for_a_node() -> None:
    result = authd("cluster", "check", "--file", str(EXAMPLE), "--node", "node-b")
    assert result.returncode == 0, result.stderr
    assert "valid, version" in result.stdout
    assert "nodes: 2, endpoints: 2 (2 identities), policy rules: 2" in result.stdout
    assert (
        'node "node-b": 1 local identities, 3 policy entries, 2 auth pairs, 1 attestations' in result.stdout
    )


def test_cluster_check_lists_every_problem(tmp_path: Path) -> None:
    path = tmp_path / "cluster.toml"
    path.write_text(
        EXAMPLE.read_text()
        .replace('node = "node-b"', 'node = "node-c"')
        .replace('enforce = "both"', 'enforce = "all"')
    )
    result = authd("cluster", "check", "--file", str(path), "--node", "node-a")
    assert result.returncode == 1
    assert f"authd: invalid cluster state {path}:" in result.stderr
    assert 'policy[0].enforce: must be one of "ingress", "egress", "both", got "all"' in result.stderr
    assert "Traceback" not in result.stderr


def test_cluster_check_takes_file_and_node_from_the_config(tmp_path: Path) -> None:
    config = tmp_path / "authd.toml"
    config.write_text(f'[node]\nname = "node-z"\n[cluster]\nfile = "{EXAMPLE}"\n')
    result = authd("cluster", "check", "--config", str(config))
    assert result.returncode == 1
    assert 'node "node-z": not in cluster state' in result.stderr
