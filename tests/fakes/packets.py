"""Hand-built Ethernet frames for BPF_PROG_TEST_RUN: well-formed, truncated, fragmented, with options.

Checksums are left zero: the programs never look at them.
"""

from __future__ import annotations

import struct
from ipaddress import IPv4Address, IPv6Address, ip_address

ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD
ETH_P_ARP = 0x0806
ETH_P_8021Q = 0x8100

TCP = 6
UDP = 17
ICMP = 1
ICMPV6 = 58
NEIGHBOR_SOLICITATION = 135
SYN, ACK, FIN, RST, PSH = 0x02, 0x10, 0x01, 0x04, 0x08

SRC_MAC = bytes.fromhex("020000000001")
DST_MAC = bytes.fromhex("020000000002")


def ethernet(payload: bytes, ethertype: int, *, vlan: int | None = None) -> bytes:
    """An Ethernet frame, optionally with one in-band 802.1Q tag."""
    header = DST_MAC + SRC_MAC
    if vlan is not None:
        header += struct.pack("!HH", ETH_P_8021Q, vlan)
    return header + struct.pack("!H", ethertype) + payload


def tcp(sport: int, dport: int, flags: int = SYN) -> bytes:
    """A 20-byte TCP header."""
    return struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 5 << 4, flags, 65535, 0, 0)


def udp(sport: int, dport: int, payload: bytes = b"x") -> bytes:
    """A UDP header and payload."""
    return struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload


def ipv4(  # noqa: PLR0913 - every header field a test may break
    src: str,
    dst: str,
    protocol: int,
    payload: bytes,
    *,
    options: bytes = b"",
    frag_offset: int = 0,
    more_fragments: bool = False,
    ident: int = 1,
    version: int = 4,
    ihl: int | None = None,
) -> bytes:
    """An IPv4 packet; ``ihl`` overrides the header length field (to build broken ones)."""
    words = ihl if ihl is not None else 5 + len(options) // 4
    flags_frag = (0x2000 if more_fragments else 0) | (frag_offset // 8)
    header = struct.pack(
        "!BBHHHBBH4s4s",
        (version << 4) | words,
        0,
        20 + len(options) + len(payload),
        ident,
        flags_frag,
        64,
        protocol,
        0,
        IPv4Address(src).packed,
        IPv4Address(dst).packed,
    )
    return header + options + payload


def ipv6(src: str, dst: str, nexthdr: int, payload: bytes, *, version: int = 6, hop_limit: int = 64) -> bytes:
    """An IPv6 packet; extension headers go in ``payload`` with :func:`ipv6_ext`/:func:`ipv6_fragment`."""
    return (
        struct.pack("!IHBB", version << 28, len(payload), nexthdr, hop_limit)
        + IPv6Address(src).packed
        + IPv6Address(dst).packed
        + payload
    )


def icmpv6(icmp_type: int, code: int = 0) -> bytes:
    """An ICMPv6 message: type, code, checksum and four more bytes (a neighbour solicitation's reserved
    field; its target address is not needed here)."""
    return struct.pack("!BBHI", icmp_type, code, 0, 0)


def ipv6_ext(nexthdr: int, length_units: int = 0) -> bytes:
    """A hop-by-hop, routing or destination-options header of (length_units + 1) * 8 bytes."""
    return struct.pack("!BB", nexthdr, length_units) + b"\x01\x04" + b"\x00" * (4 + 8 * length_units)


def ipv6_fragment(nexthdr: int, offset: int, *, more: bool = False, ident: int = 7) -> bytes:
    """An IPv6 fragment header."""
    return struct.pack("!BBHI", nexthdr, 0, (offset // 8) << 3 | (1 if more else 0), ident)


def tcp_frame(src: str, dst: str, sport: int = 40000, dport: int = 80, flags: int = SYN) -> bytes:
    """An Ethernet frame with a TCP segment over IPv4 or IPv6, chosen by the addresses."""
    if ip_address(src).version == 4:
        return ethernet(ipv4(src, dst, TCP, tcp(sport, dport, flags)), ETH_P_IP)
    return ethernet(ipv6(src, dst, TCP, tcp(sport, dport, flags)), ETH_P_IPV6)


def arp_frame(sender: str = "0.0.0.0", target: str = "0.0.0.0", *, op: int = 1) -> bytes:  # noqa: S104
    """An ARP request (op 1) or reply (op 2); the default sender 0.0.0.0 makes it a probe."""
    body = (
        struct.pack("!HHBBH", 1, ETH_P_IP, 6, 4, op)
        + SRC_MAC
        + IPv4Address(sender).packed
        + bytes(6)
        + IPv4Address(target).packed
    )
    return ethernet(body, ETH_P_ARP)


ETH_P_8021AD = 0x88A8


def tagged(payload: bytes, ethertype: int, tpids: list[int]) -> bytes:
    """An Ethernet frame with a stack of in-band VLAN tags (VID 0, priority tags), outermost first."""
    header = DST_MAC + SRC_MAC + b"".join(struct.pack("!HH", tpid, 0) for tpid in tpids)
    return header + struct.pack("!H", ethertype) + payload


def neighbor(icmp_type: int, src: str, dst: str, target: str) -> bytes:
    """A neighbour solicitation (135) or advertisement (136) for ``target``, hop limit 255."""
    body = struct.pack("!BBHI", icmp_type, 0, 0, 0) + IPv6Address(target).packed
    return ethernet(ipv6(src, dst, ICMPV6, body, hop_limit=255), ETH_P_IPV6)


def icmp_error(src: str, dst: str, quoted: bytes) -> bytes:
    """An ICMP "fragmentation needed" (IPv4) or ICMPv6 "packet too big" quoting ``quoted`` (an IP packet)."""
    if ip_address(src).version == 4:
        return ethernet(ipv4(src, dst, ICMP, struct.pack("!BBHHH", 3, 4, 0, 0, 1400) + quoted), ETH_P_IP)
    return ethernet(ipv6(src, dst, ICMPV6, struct.pack("!BBHI", 2, 0, 0, 1280) + quoted), ETH_P_IPV6)
