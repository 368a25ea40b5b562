from __future__ import annotations

from authd.health import Health, State


def ready(health: Health) -> bool:
    return health.is_ready  # read through a call, so mypy does not narrow the property between asserts


def healthy(health: Health) -> bool:
    return health.healthy


async def test_ready_once_every_gating_component_was_ready() -> None:
    health = Health()
    svids = health.register("svids")
    datapath = health.register("datapath")
    health.register("metrics", gates_ready=False)
    svids.ready()
    assert not ready(health)
    datapath.ready()
    assert ready(health)
    svids.degraded("stream reconnecting")
    assert ready(health)
    assert health.summary() == "svids degraded: stream reconnecting"


async def test_failed_component_makes_daemon_unhealthy() -> None:
    health = Health()
    component = health.register("datapath")
    assert healthy(health)
    component.failed("tc detached")
    assert not healthy(health)
    assert health.snapshot()[0].state is State.FAILED
    component.ready()
    assert healthy(health)
