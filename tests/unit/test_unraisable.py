"""A non-ASCII SNI on a TLS listener: counted and logged at a limited rate, never a stderr traceback."""

from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess
from pathlib import Path

import pytest
import structlog.testing

from authd.unraisable import UnraisableLog, captured


def _server_context(tmp_path: Path) -> ssl.SSLContext:
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=test"],
        check=True, capture_output=True,
    )  # fmt: skip
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    context.sni_callback = lambda _sock, _name, _ctx: None
    return context


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command (raw SNI bytes)")
async def test_a_non_ascii_sni_is_counted_not_printed(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    context = _server_context(tmp_path)
    server = await asyncio.start_server(lambda _r, w: w.close(), "127.0.0.1", 0, ssl=context)
    port = server.sockets[0].getsockname()[1]
    hook = UnraisableLog(interval=60.0)
    with captured(hook), structlog.testing.capture_logs() as logs:
        for _ in range(3):
            client = await asyncio.create_subprocess_exec(
                "openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "caf\xe9.example",
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
            )  # fmt: skip
            await asyncio.wait_for(client.wait(), 10)
    server.close()
    await server.wait_closed()
    assert hook.counts == {"invalid_sni": 3}
    assert [entry["event"] for entry in logs] == [
        "attest: TLS client sent a non-ASCII SNI, handshake refused"
    ]
    assert logs[0]["count"] == 1
    assert "Traceback" not in capfd.readouterr().err


def test_the_rate_limit_reports_what_it_held_back() -> None:
    now = [0.0]
    hook = UnraisableLog(interval=10.0, clock=lambda: now[0])

    class Args:
        exc_value = UnicodeDecodeError("ascii", b"\xc3", 0, 1, "ordinal not in range(128)")
        object = b"\xc3"

    with structlog.testing.capture_logs() as logs:
        for step in (0.0, 1.0, 2.0, 11.0):
            now[0] = step
            hook(Args())
    assert [entry["count"] for entry in logs] == [1, 3]
    assert hook.counts == {"invalid_sni": 4}
