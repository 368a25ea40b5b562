"""Workload traffic for the cluster harness: echo servers and clients that report what got through.

Run as ``python -m authd.devcluster.traffic MODE ...`` inside a workload's namespace, under the
workload's uid. Clients print one JSON report on stdout when done (or on SIGTERM). TCP hides drops by
retransmitting, so TCP clients report the kernel's retransmission count (``tcpi_total_retrans``): zero
means no segment of the connection was lost, the first SYN included.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import signal
import socket
import struct
import time
from typing import cast

_TCP_INFO_TOTAL_RETRANS = 100  # offset of tcpi_total_retrans in struct tcp_info (linux/tcp.h)


def total_retransmits(sock: socket.socket) -> int:
    """Segments the kernel retransmitted on this connection so far, SYNs included."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    return int(struct.unpack_from("I", info, _TCP_INFO_TOTAL_RETRANS)[0])


def _listening(kind: socket.SocketKind, port: int) -> socket.socket:
    """A socket bound to every address of the namespace: IPv6 and IPv4 (mapped), or IPv4 without IPv6."""
    try:
        sock = socket.socket(socket.AF_INET6, kind)
    except OSError:  # IPv6 disabled in this kernel
        sock = socket.socket(socket.AF_INET, kind)
        sock.bind(("0.0.0.0", port))  # noqa: S104 - inside a test namespace
    else:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(("::", port))
    if kind == socket.SOCK_STREAM:
        sock.listen(128)
    sock.setblocking(False)  # noqa: FBT003 - the socket API's own spelling
    return sock


async def tcp_server(port: int) -> None:
    """Echo every byte back on every connection."""

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, sock=_listening(socket.SOCK_STREAM, port))
    print(json.dumps({"listening": port}), flush=True)
    async with server:
        await server.serve_forever()


class _UdpEcho(asyncio.DatagramProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Python 3.11's selector datagram transport does not subclass DatagramTransport.
        self.transport = cast("asyncio.DatagramTransport", transport)

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        self.transport.sendto(data, addr)


async def udp_server(port: int) -> None:
    """Echo every datagram back to its sender."""
    loop = asyncio.get_running_loop()
    await loop.create_datagram_endpoint(_UdpEcho, sock=_listening(socket.SOCK_DGRAM, port))
    print(json.dumps({"listening": port}), flush=True)
    await asyncio.Future()


async def tcp_flow(
    address: str, port: int, interval: float, duration: float, connect_timeout: float
) -> dict[str, object]:
    """Connect, then send a numbered 8-byte message every ``interval`` and check each echo.

    The report names the client's port even when the connection fails (it is bound first), so the
    flows of exactly this connection can be found in ``authd observe``; ``syn_retrans`` counts the SYNs
    the kernel had to send again, also for a connection that never came up.
    """
    report: dict[str, object] = {"connected": False, "sent": 0, "echoed": 0}
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()  # SIGTERM ends the flow with a report, also while it connects
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    family = socket.AF_INET6 if ipaddress.ip_address(address).version == 6 else socket.AF_INET
    raw = socket.socket(family, socket.SOCK_STREAM)
    raw.setblocking(False)  # noqa: FBT003 - the socket API's own spelling
    raw.bind(("", 0))
    report["local_port"] = raw.getsockname()[1]
    started = time.monotonic()
    try:
        await asyncio.wait_for(loop.sock_connect(raw, (address, port)), connect_timeout)
        reader, writer = await asyncio.open_connection(sock=raw)
    except (TimeoutError, OSError) as err:
        report.update(error=f"connect: {type(err).__name__}: {err}", syn_retrans=total_retransmits(raw))
        raw.close()
        return report
    sock = writer.get_extra_info("socket")
    report.update(
        connected=True,
        connect_ms=round((time.monotonic() - started) * 1000, 3),
        syn_retrans=total_retransmits(sock),
    )
    deadline = started + duration
    sent = echoed = 0
    max_gap = 0.0
    last_echo = time.monotonic()
    try:
        while not stop.is_set() and (duration <= 0 or time.monotonic() < deadline):
            writer.write(struct.pack("!Q", sent))
            sent += 1
            await writer.drain()
            data = await asyncio.wait_for(reader.readexactly(8), 10)
            if struct.unpack("!Q", data)[0] != echoed:
                report["error"] = f"echo out of order at {echoed}"
                break
            echoed += 1
            now = time.monotonic()
            max_gap, last_echo = max(max_gap, now - last_echo), now
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)
    except (TimeoutError, OSError, asyncio.IncompleteReadError) as err:
        report["error"] = f"flow: {type(err).__name__}: {err}"
    report.update(
        sent=sent, echoed=echoed, total_retrans=total_retransmits(sock), max_gap_ms=round(max_gap * 1000, 3)
    )
    writer.close()
    return report


async def udp_flow(address: str, port: int, interval: float, count: int) -> dict[str, object]:
    """Send ``count`` numbered datagrams, one every ``interval``; count the echoes."""
    loop = asyncio.get_running_loop()
    received: set[int] = set()

    class Client(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
            del addr
            received.add(struct.unpack("!Q", data[:8])[0])

    transport, _ = await loop.create_datagram_endpoint(Client, remote_addr=(address, port))
    local_port = transport.get_extra_info("sockname")[1]
    for seq in range(count):
        transport.sendto(struct.pack("!Q", seq))
        await asyncio.sleep(interval)
    await asyncio.sleep(0.5)
    transport.close()
    return {
        "local_port": local_port,
        "sent": count,
        "echoed": len(received),
        "lost": count - len(received),
        "first_echoed": 0 in received,
    }


def main() -> None:
    """Parse the mode and run it."""
    parser = argparse.ArgumentParser(prog="python -m authd.devcluster.traffic")
    modes = parser.add_subparsers(dest="mode", required=True)
    for name in ("tcp-server", "udp-server"):
        modes.add_parser(name).add_argument("--port", type=int, required=True)
    flow = modes.add_parser("tcp-flow")
    flow.add_argument("--to", required=True)
    flow.add_argument("--port", type=int, required=True)
    flow.add_argument("--interval", type=float, default=0.01)
    flow.add_argument("--duration", type=float, default=0.0, help="0: until SIGTERM")
    flow.add_argument("--connect-timeout", type=float, default=5.0)
    udp = modes.add_parser("udp-flow")
    udp.add_argument("--to", required=True)
    udp.add_argument("--port", type=int, required=True)
    udp.add_argument("--interval", type=float, default=0.01)
    udp.add_argument("--count", type=int, default=10)
    args = parser.parse_args()
    if args.mode == "tcp-server":
        asyncio.run(tcp_server(args.port))
    elif args.mode == "udp-server":
        asyncio.run(udp_server(args.port))
    elif args.mode == "tcp-flow":
        report = asyncio.run(tcp_flow(args.to, args.port, args.interval, args.duration, args.connect_timeout))
        print(json.dumps(report), flush=True)
    else:
        print(json.dumps(asyncio.run(udp_flow(args.to, args.port, args.interval, args.count))), flush=True)


if __name__ == "__main__":
    main()
