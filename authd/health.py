"""Per-component health: what systemd's READY and watchdog, ``/readyz`` and ``authd status`` report.

Each component registers once and then reports its own state. The daemon is *ready* once every component
that gates readiness has been ready at least once, and *healthy* while no component has failed.
"""

from __future__ import annotations

import asyncio
import enum
import time
from dataclasses import dataclass


class State(enum.StrEnum):
    """What a component says about itself."""

    STARTING = "starting"
    READY = "ready"
    DEGRADED = "degraded"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class ComponentStatus:
    """One component's current state, why, and since when (Unix seconds)."""

    name: str
    state: State
    reason: str
    since: float
    gates_ready: bool


class Component:
    """The handle a component uses to report its state."""

    def __init__(self, registry: Health, name: str, *, gates_ready: bool) -> None:
        """Start in STARTING; only the registry creates components."""
        self._registry = registry
        self.name = name
        self.gates_ready = gates_ready
        self.status = ComponentStatus(name, State.STARTING, "", time.time(), gates_ready)
        self.was_ready = False

    def ready(self, reason: str = "") -> None:
        """Working as intended."""
        self._set(State.READY, reason)

    def degraded(self, reason: str) -> None:
        """Working, but with a problem an operator should see (a stream reconnecting, stale data)."""
        self._set(State.DEGRADED, reason)

    def failed(self, reason: str) -> None:
        """Not working; the watchdog stops being fed while any component is failed."""
        self._set(State.FAILED, reason)

    def _set(self, state: State, reason: str) -> None:
        if (state, reason) == (self.status.state, self.status.reason):
            return
        self.status = ComponentStatus(self.name, state, reason, time.time(), self.gates_ready)
        if state is State.READY:
            self.was_ready = True
        self._registry.changed()


class Health:
    """The registry of components."""

    def __init__(self) -> None:
        """Start empty; components register while the daemon is built."""
        self._components: dict[str, Component] = {}
        self._ready = asyncio.Event()

    def register(self, name: str, *, gates_ready: bool = True) -> Component:
        """Add a component; ``gates_ready`` components must be ready once before the daemon is ready."""
        if name in self._components:
            raise ValueError(f"health: component {name!r} registered twice")
        component = Component(self, name, gates_ready=gates_ready)
        self._components[name] = component
        return component

    def changed(self) -> None:
        """Recompute readiness after a component changed."""
        if all(c.was_ready for c in self._components.values() if c.gates_ready):
            self._ready.set()

    async def wait_ready(self) -> None:
        """Return once every gating component has been ready (at once if none gates readiness)."""
        self.changed()
        await self._ready.wait()

    @property
    def is_ready(self) -> bool:
        """Whether start-up is complete."""
        return self._ready.is_set()

    @property
    def healthy(self) -> bool:
        """Whether no component is failed."""
        return all(c.status.state is not State.FAILED for c in self._components.values())

    def snapshot(self) -> list[ComponentStatus]:
        """Every component's status, in registration order."""
        return [c.status for c in self._components.values()]

    def summary(self) -> str:
        """Summarise health in one line for systemd."""
        bad = [s for s in self.snapshot() if s.state in (State.DEGRADED, State.FAILED)]
        if not bad:
            return "ready" if self.is_ready else "starting"
        return "; ".join(f"{s.name} {s.state}: {s.reason}" for s in bad)
