"""The HTTP endpoints, served by aiohttp inside the daemon's own event loop.

- ``GET /metrics``: Prometheus text format, or OpenMetrics when the Accept header asks (:mod:`authd.metrics`).
- ``GET /healthz``: liveness, 200 while the process serves requests; says whether a component failed.
- ``GET /readyz``: readiness, 503 until every gating component (SVIDs, datapath, cluster state) has been
  ready once and while one of them is failed, 200 otherwise; per-component JSON either way. A degraded
  component (SPIRE down, the last good SVIDs still serving) keeps it 200: authd still enforces with the
  state SPIRE last vouched for, and ``authd_fail_closed_in_seconds`` says for how long.

Loopback by default (``[http] listen_address``): nothing here is authenticated. The server is a named
daemon job; failing to bind is logged and retried, and never stops enforcement.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import structlog
from aiohttp import web

from authd.config.model import HttpConfig
from authd.daemonview import DaemonView, HealthSource, ready_now
from authd.metrics import registry_for, render

log = structlog.get_logger(__name__)


def components(health: HealthSource) -> list[dict[str, Any]]:
    """Every component's status as JSON objects."""
    return [
        {
            "name": status.name,
            "state": status.state.value,
            "reason": status.reason,
            "since": status.since,
            "gates_ready": status.gates_ready,
        }
        for status in health.snapshot()
    ]


def application(view: DaemonView) -> web.Application:
    """The aiohttp application serving the three endpoints from ``view``."""
    registry = registry_for(view)

    async def metrics(request: web.Request) -> web.Response:
        body, content_type = render(registry, request.headers.get("Accept", ""))
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def healthz(_request: web.Request) -> web.Response:
        return web.json_response({"alive": True, "healthy": view.health.healthy})

    async def readyz(_request: web.Request) -> web.Response:
        ready = ready_now(view.health)
        body = {"ready": ready, "components": components(view.health)}
        return web.json_response(body, status=200 if ready else 503)

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app


class HttpServer:
    """Serves :func:`application` on ``[http] listen_address:port`` until cancelled."""

    def __init__(
        self, config: HttpConfig, view: DaemonView, *, on_listening: Callable[[str], None] | None = None
    ) -> None:
        """Nothing binds until :meth:`run`; ``on_listening`` receives ``host:port`` once serving."""
        self._config = config
        self._view = view
        self._on_listening = on_listening
        self.bound: tuple[str, int] | None = None

    async def run(self) -> None:
        """Bind and serve; raise OSError if the address cannot be bound (the supervisor retries)."""
        runner = web.AppRunner(application(self._view), access_log=None, handle_signals=False)
        await runner.setup()
        try:
            site = web.TCPSite(runner, self._config.listen_address, self._config.port, reuse_address=True)
            await site.start()
            server = site._server  # noqa: SLF001 - aiohttp exposes the bound port only here
            sockets = getattr(server, "sockets", None) or []
            host, port = sockets[0].getsockname()[:2] if sockets else (self._config.listen_address, 0)
            self.bound = (str(host), int(port))
            where = f"{host}:{port}"
            log.info("http endpoints serving", address=where)
            if self._on_listening is not None:
                self._on_listening(where)
            await asyncio.Future()  # serve until cancelled
        finally:
            self.bound = None
            await runner.cleanup()
