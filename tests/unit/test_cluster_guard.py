"""The deploy guard: which valid states are held back, and `authd cluster accept` over the control socket."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from authd.cli import main
from authd.cluster.file import FileClusterSource
from authd.cluster.guard import hold_reason, serve_accept
from authd.control import ControlServer
from authd.health import Health
from tests.fakes.cluster import endpoint, node, state
from tests.unit.test_cluster_file import GOOD, NODES

A, B = node("node-a"), node("node-b")
FOUR = state(
    [A, B],
    [endpoint(f"w{i}", "node-a" if i % 2 else "node-b", f"10.0.0.{i}") for i in range(1, 5)],
)


def test_first_state_is_never_held() -> None:
    assert hold_reason(None, state(), local_node="node-a", max_endpoint_removal=1.0) is None


def test_moving_addresses_is_not_a_removal() -> None:
    moved = state(
        [A, B], [endpoint(f"w{i}", "node-a" if i % 2 else "node-b", f"10.9.0.{i}") for i in range(1, 5)]
    )
    assert hold_reason(FOUR, moved, local_node="node-a", max_endpoint_removal=0.1) is None


def test_share_boundary_is_inclusive() -> None:
    half = state([A, B], FOUR.endpoints[:2])
    assert hold_reason(FOUR, half, local_node="node-a", max_endpoint_removal=0.5) is None
    quarter = state([A, B], FOUR.endpoints[:1])
    assert hold_reason(FOUR, quarter, local_node="node-a", max_endpoint_removal=0.5) == (
        "it removes 3 of 4 endpoints, more than the 50% allowed at once (cluster.max_endpoint_removal)"
    )


def test_a_node_never_listed_is_not_held() -> None:
    # Only a state that *no longer* lists the node is a likely mistake; one that never did is a setup step.
    assert (
        hold_reason(FOUR, state([A, B], FOUR.endpoints), local_node="node-z", max_endpoint_removal=1.0)
        is None
    )


@contextlib.asynccontextmanager
async def daemon_side(tmp_path: Path) -> AsyncIterator[FileClusterSource]:
    """A file source and the control socket serving its accept op, as the daemon wires them."""
    source = FileClusterSource(
        tmp_path / "cluster.toml", "node-a", Health().register("cluster"), clock=lambda: time.time() + 10
    )
    server = ControlServer(tmp_path / "run" / "authd.sock")
    server.register("cluster-accept", lambda request: serve_accept(source, request))
    task = asyncio.create_task(server.run())
    await asyncio.wait_for(server.listening.wait(), 5)
    try:
        yield source
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def cli(tmp_path: Path, *args: str) -> int:
    config = tmp_path / "authd.toml"
    config.write_text(f'[node]\nruntime_dir = "{tmp_path}/run"\n')
    with pytest.raises(SystemExit) as exited:
        main(["cluster", "accept", "--config", str(config), *args])
    return int(exited.value.code or 0)


async def test_cluster_accept_applies_a_legitimate_large_removal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async with daemon_side(tmp_path) as source:
        path = tmp_path / "cluster.toml"
        path.write_text(GOOD)
        source.poll()
        assert await asyncio.to_thread(cli, tmp_path) == 1
        assert "no cluster state is held back" in capsys.readouterr().err

        # Decommissioning every workload at once is legitimate, and needs the operator's word.
        staging = tmp_path / "staging.toml"
        staging.write_text(NODES)
        staging.replace(path)
        source.poll()
        held = source.stats.held_version
        assert held
        assert await asyncio.to_thread(cli, tmp_path, "--version", "0000") == 1
        assert f"the held version is {held[:12]}, not 0000; nothing accepted" in capsys.readouterr().err
        assert source.current() is not None
        assert source.current().endpoints  # type: ignore[union-attr]

        assert await asyncio.to_thread(cli, tmp_path, "--version", held[:8]) == 0
        assert capsys.readouterr().out.endswith(f"accepted version {held[:12]}: 2 nodes, 0 endpoints\n")
        current = source.current()
        assert current is not None
        assert current.version == held
        assert not current.endpoints
        assert source.stats.held_version == ""
