"""A flood of unauthenticated connections against a node channel listener (the privileged test and the bench).

Three kinds, sent in batches of ``batch`` at a time: bare connections that send nothing, bogus TLS
ClientHello records, and real TLS 1.3 handshakes that name a server and offer no client certificate (the
kind that cost the old listener most loop time). Each one counts as *refused* when the listener closes it
without answering a byte: a FIN, or a reset (the kernel resets a connection closed with unread data in its
receive queue, which is what a ClientHello that arrives before the close becomes); a handshake counts as
refused when it fails before the server's first flight was read.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import sys
from dataclasses import dataclass

HELLO = bytes.fromhex("16030100c4010000c00303") + bytes(32) + b"\x00\x00\x02\x13\x01\x01\x00"
"""The start of a ClientHello record that announces more bytes than it carries."""
ANSWER_TIMEOUT = 5.0


@dataclass(frozen=True, slots=True)
class Flood:
    """How many of each kind, and the server name the handshakes ask for."""

    connections: int = 2000
    hellos: int = 1000
    handshakes: int = 1000
    server_name: str = "node-a"
    batch: int = 100

    @property
    def total(self) -> int:
        """Connections made by one run of the flood."""
        return self.connections + self.hellos + self.handshakes


def _no_certificate_context() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    return context


async def _raw(address: str, port: int, payload: bytes | None, source: tuple[str, int] | None) -> bool:
    reader, writer = await asyncio.open_connection(address, port, local_addr=source)
    try:
        if payload is not None:
            writer.write(payload)
        try:
            answer = await asyncio.wait_for(reader.read(), ANSWER_TIMEOUT)
        except ConnectionResetError:
            answer = b""
        return answer == b""
    finally:
        writer.transport.abort()


async def _handshake(
    address: str, port: int, context: ssl.SSLContext, server_name: str, source: tuple[str, int] | None
) -> bool:
    try:
        async with asyncio.timeout(ANSWER_TIMEOUT):
            _, writer = await asyncio.open_connection(
                address, port, ssl=context, server_hostname=server_name, local_addr=source
            )
    except (ssl.SSLError, ConnectionError, asyncio.IncompleteReadError):
        return True
    except TimeoutError:
        return False  # held open: not refused
    writer.transport.abort()
    return False  # the server answered the handshake


async def flood(address: str, port: int, plan: Flood, *, source: str | None = None) -> int:
    """Send ``plan`` to ``address:port`` (from ``source``, if given); how many were refused unanswered."""
    bind = (source, 0) if source is not None else None
    context = _no_certificate_context()
    kinds: list[bytes | str | None] = [None] * plan.connections
    kinds += [HELLO] * plan.hellos
    kinds += ["tls"] * plan.handshakes

    async def one(kind: bytes | str | None) -> bool:
        if kind == "tls":
            return await _handshake(address, port, context, plan.server_name, bind)
        assert not isinstance(kind, str)
        return await _raw(address, port, kind, bind)

    refused = 0
    for start in range(0, len(kinds), plan.batch):
        outcomes = await asyncio.gather(*(one(kind) for kind in kinds[start : start + plan.batch]))
        refused += sum(outcomes)
    return refused


async def flood_for(address: str, port: int, plan: Flood, seconds: float) -> dict[str, int]:
    """Send ``plan`` again and again for ``seconds`` (once at least); how many were sent and refused."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    sent = refused = 0
    while True:
        refused += await flood(address, port, plan)
        sent += plan.total
        if loop.time() >= deadline:
            return {"sent": sent, "refused": refused}


def main() -> None:
    """``python -m tests.privileged.flood ADDRESS PORT SECONDS SERVER_NAME``: prints the outcome as JSON."""
    address, port, seconds, server_name = sys.argv[1:5]
    outcome = asyncio.run(flood_for(address, int(port), Flood(server_name=server_name), float(seconds)))
    print(json.dumps(outcome))  # noqa: T201 - the result, for the parent


if __name__ == "__main__":
    main()
