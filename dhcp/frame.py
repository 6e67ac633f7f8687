"""Ethernet frames of DHCP requests, as a packet socket reads them: pure parsing.

The server reads the guest link itself (not a UDP socket) because the Ethernet
source address is the only thing in a request the guest cannot choose freely
without also changing what the switch sees; chaddr, option 61 and the IP source
are all the sender's word.  `parse` takes a whole frame and returns the source
MAC, the IP addresses and the UDP payload; `FILTER` is the classic BPF program
that lets the kernel queue only candidate frames.  UDP checksums are not checked:
a veth or an offloading NIC hands frames up with the checksum not filled in, and
the DHCP decoder checks the payload anyway.
"""

from __future__ import annotations

import socket
import struct

from dhcp.codec import DecodeError

ETH_P_IP = 0x0800
ETH_HLEN = 14
SERVER_PORT = 67
_ntoa = socket.inet_ntoa


_HEADERS = struct.Struct("!BxHxxHxB2x4s4s")  # version/ihl, length, fragment, protocol, src, dst
_UDP = struct.Struct("!2xHH")  # destination port, length


def parse(frame: bytes) -> tuple[bytes, str, str, bytes]:
    """(Ethernet source, IP source, IP destination, UDP payload) of one frame.

    Raises DecodeError ("bad_ip", "bad_udp") for anything that is not one whole,
    unfragmented IPv4 UDP datagram to port 67.
    """
    if len(frame) < ETH_HLEN + 28 or frame[12:14] != b"\x08\x00":
        raise DecodeError("bad_ip", "not an IPv4 frame")
    vihl, total, frag, proto, src, dst = _HEADERS.unpack_from(frame, ETH_HLEN)
    ihl = (vihl & 15) * 4
    if vihl >> 4 != 4 or ihl < 20:
        raise DecodeError("bad_ip", "not an IPv4 header")
    end = ETH_HLEN + total  # frames are padded to 60 bytes: the IP length counts
    if end > len(frame) or total < ihl + 8:
        raise DecodeError("bad_ip", f"IP length {total}")
    if frag & 0x3FFF or proto != 17:
        raise DecodeError("bad_ip", "a fragment or not UDP")
    u = ETH_HLEN + ihl
    dport, ulen = _UDP.unpack_from(frame, u)
    if dport != SERVER_PORT or ulen < 8 or u + ulen > end:
        raise DecodeError("bad_udp", f"port {dport}, UDP length {ulen}")
    return frame[6:12], _ntoa(src), _ntoa(dst), frame[u + 8 : u + ulen]


def _checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071) of `data`."""
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def build(
    src_mac: bytes, dst_mac: bytes, src_ip: str, dst_ip: str, sport: int, dport: int, payload: bytes
) -> bytes:
    """One Ethernet frame of an IPv4 UDP datagram, checksums filled in: a reply sent on
    the link straight to a client's hardware address, which has no address to ARP for
    yet (RFC 2131 section 4.1), without asking the kernel for a neighbour entry."""
    src, dst = socket.inet_aton(src_ip), socket.inet_aton(dst_ip)
    ulen = 8 + len(payload)
    pseudo = src + dst + struct.pack("!BBH", 0, 17, ulen)
    udp = struct.pack("!HHHH", sport, dport, ulen, 0) + payload
    csum = _checksum(pseudo + udp) or 0xFFFF  # 0 would mean "no checksum"
    udp = udp[:6] + struct.pack("!H", csum) + udp[8:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + ulen, 0, 0x4000, 64, 17, 0, src, dst)
    ip = ip[:10] + struct.pack("!H", _checksum(ip)) + ip[12:]
    return dst_mac + src_mac + b"\x08\x00" + ip + udp


def _insn(code: int, jt: int, jf: int, k: int) -> bytes:
    return struct.pack("=HBBI", code, jt, jf, k)


# Classic BPF over the whole frame (SOCK_RAW): incoming (not our own outgoing copies,
# not other hosts' frames seen in promiscuous mode), IPv4, UDP, not a fragment,
# destination port 67.  Everything else never reaches the server's queue.
SKF_AD_PKTTYPE = 0xFFFFF000 + 4
PACKET_MULTICAST = 2
FILTER = b"".join(
    (
        _insn(0x20, 0, 0, SKF_AD_PKTTYPE),  # ld pkttype
        _insn(0x25, 9, 0, PACKET_MULTICAST),  # jgt #2 -> drop (otherhost, outgoing)
        _insn(0x28, 0, 0, 12),  # ldh [12]: ethertype
        _insn(0x15, 0, 7, ETH_P_IP),  # jne IPv4 -> drop
        _insn(0x30, 0, 0, ETH_HLEN + 9),  # ldb [23]: protocol
        _insn(0x15, 0, 5, 17),  # jne UDP -> drop
        _insn(0x28, 0, 0, ETH_HLEN + 6),  # ldh [20]: flags, fragment offset
        _insn(0x45, 3, 0, 0x3FFF),  # jset MF|offset -> drop
        _insn(0xB1, 0, 0, ETH_HLEN),  # ldxb 4*([14]&0xf): IP header length
        _insn(0x48, 0, 0, ETH_HLEN + 2),  # ldh [x+16]: UDP destination port
        _insn(0x15, 1, 0, SERVER_PORT),  # jeq 67 -> accept
        _insn(0x06, 0, 0, 0),  # drop: ret #0
        _insn(0x06, 0, 0, 0xFFFF),  # accept: ret #65535
    )
)
DROP_ALL = _insn(0x06, 0, 0, 0)  # for the UDP socket that only sends
