from __future__ import annotations

import asyncio

import aiohttp
from aiohttp.test_utils import TestClient, TestServer

from authd.config.model import HttpConfig
from authd.daemonview import DaemonView
from authd.health import Health
from authd.httpapi import HttpServer, application
from tests.waiting import eventually


async def test_readyz_is_503_until_every_gating_component_was_ready() -> None:
    health = Health()
    svids, datapath = health.register("svids"), health.register("datapath")
    health.register("http", gates_ready=False)
    async with TestClient(TestServer(application(DaemonView(node="n", health=health)))) as client:
        response = await client.get("/readyz")
        assert response.status == 503
        body = await response.json()
        assert body["ready"] is False
        assert {c["name"]: c["state"] for c in body["components"]} == {
            "svids": "starting",
            "datapath": "starting",
            "http": "starting",
        }
        svids.ready()
        assert (await client.get("/readyz")).status == 503
        datapath.ready("attached to 1 interfaces")
        response = await client.get("/readyz")
        assert response.status == 200
        assert (await response.json())["components"][1]["reason"] == "attached to 1 interfaces"
        datapath.degraded("netlink lost")  # degraded still serves: ready
        assert (await client.get("/readyz")).status == 200
        datapath.failed("programs gone")
        assert (await client.get("/readyz")).status == 503
        health_body = await (await client.get("/healthz")).json()
        assert health_body == {"alive": True, "healthy": False}
        metrics = await client.get("/metrics")
        assert metrics.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        assert "authd_ready 0.0" in await metrics.text()  # as /readyz
        openmetrics = await client.get("/metrics", headers={"Accept": "application/openmetrics-text"})
        assert openmetrics.headers["Content-Type"].startswith("application/openmetrics-text; version=1.0.0")
        assert (await openmetrics.text()).endswith("# EOF\n")


async def test_server_binds_serves_and_reports_where() -> None:
    where: list[str] = []
    server = HttpServer(HttpConfig(port=0), DaemonView(node="n", health=Health()), on_listening=where.append)
    task = asyncio.create_task(server.run())
    try:
        await eventually(lambda: server.bound is not None)
        assert server.bound is not None
        host, port = server.bound
        assert where == [f"127.0.0.1:{port}"]
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://{host}:{port}/healthz") as response,
        ):
            assert response.status == 200
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert server.bound is None
