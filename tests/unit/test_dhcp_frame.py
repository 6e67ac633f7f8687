"""Frames from the guest link: the Ethernet source, IP addresses and UDP payload, or a reason."""

from __future__ import annotations

import socket
import struct

import pytest

from dhcp import frame
from dhcp.codec import DecodeError

pytestmark = pytest.mark.unit
SRC = bytes.fromhex("024700000002")


def make(
    payload: bytes = b"x" * 240,
    *,
    dport: int = 67,
    proto: int = 17,
    frag: int = 0,
    ihl: int = 5,
    pad: int = 0,
    ulen: int | None = None,
    ethertype: bytes = b"\x08\x00",
) -> bytes:
    udp = struct.pack("!HHHH", 68, dport, ulen if ulen is not None else 8 + len(payload), 0)
    opts = bytes(4 * max(0, ihl - 5))
    total = 4 * ihl + len(udp) + len(payload)
    ip = struct.pack(
        "!BBHHHBBH4s4s",
        0x40 | ihl,
        0,
        total,
        1,
        frag,
        64,
        proto,
        0,
        socket.inet_aton("192.168.1.7"),
        socket.inet_aton("255.255.255.255"),
    )
    return b"\xff" * 6 + SRC + ethertype + ip + opts + udp + payload + bytes(pad)


def test_a_dhcp_frame() -> None:
    assert frame.parse(make(b"hello" * 50)) == (
        SRC,
        "192.168.1.7",
        "255.255.255.255",
        b"hello" * 50,
    )


def test_ip_options_and_ethernet_padding() -> None:
    assert frame.parse(make(b"p", ihl=7, pad=40))[3] == b"p"


@pytest.mark.parametrize(
    ("kw", "reason"),
    [
        ({"proto": 6}, "bad_ip"),
        ({"frag": 0x2000}, "bad_ip"),  # more fragments
        ({"frag": 0x0010}, "bad_ip"),  # a later fragment
        ({"ihl": 4}, "bad_ip"),
        ({"ethertype": b"\x86\xdd"}, "bad_ip"),
        ({"dport": 68}, "bad_udp"),
        ({"ulen": 7}, "bad_udp"),
        ({"ulen": 4000}, "bad_udp"),
    ],
)
def test_what_is_not_one_udp_datagram_to_port_67(kw: dict[str, object], reason: str) -> None:
    with pytest.raises(DecodeError) as exc:
        frame.parse(make(**kw))  # type: ignore[arg-type]
    assert exc.value.reason == reason


def test_truncated_frames() -> None:
    whole = make()
    for n in (0, 13, 30, 41, 100):
        with pytest.raises(DecodeError):
            frame.parse(whole[:n])


def test_the_filter_is_whole_instructions() -> None:
    assert len(frame.FILTER) % 8 == 0 and len(frame.DROP_ALL) == 8


def test_a_built_frame_reads_back_and_its_checksums_hold() -> None:
    """The reply the server sends on the link to a client's hardware address."""
    src, dst = bytes.fromhex("020000000001"), bytes.fromhex("024700000002")
    payload = b"\x02\x01\x06\x00" + bytes(240) + b"\xff"  # odd length: checksum padding
    raw = frame.build(src, dst, "192.168.1.1", "192.168.1.100", 67, 68, payload)
    assert raw[:6] == dst and raw[6:12] == src and raw[12:14] == b"\x08\x00"
    ip = raw[14:34]
    assert frame._checksum(ip) == 0  # a header with its checksum sums to zero
    udp = raw[34:]
    pseudo = ip[12:20] + bytes([0, 17]) + len(udp).to_bytes(2, "big")
    assert frame._checksum(pseudo + udp) == 0
    assert udp[:4] == (67).to_bytes(2, "big") + (68).to_bytes(2, "big")
    assert udp[8:] == payload
