"""DHCPv4 wire format (RFC 2131/2132): a BOOTP header plus options, with `struct`.

Pure bytes <-> `Message`; no sockets and no policy.  Decoding folds everything the
wire allows into one canonical form: option overload (52) moves options out of
`file` and `sname`, repeated instances of one option are concatenated (RFC 3396),
pad and end disappear, options we do not know stay raw bytes.  Encoding produces
the canonical form back, splitting options longer than 255 bytes and using the
`file`/`sname` fields only when the options do not fit the size the client accepts.
`DecodeError` is the only exception `decode` raises; its `reason` is a short word
the server counts drops by.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass, field

BOOTREQUEST = 1
BOOTREPLY = 2
MAGIC = 0x63825363
HEADER = struct.Struct("!BBBBIHH4s4s4s4s16s64s128sI")
HEADER_LEN = HEADER.size  # 240, cookie included
MIN_REPLY = 300  # RFC 1542: BOOTP relays and old clients expect at least this much
BROADCAST_FLAG = 0x8000

# message types (option 53)
DISCOVER, OFFER, REQUEST, DECLINE, ACK, NAK, RELEASE, INFORM = range(1, 9)
TYPE_NAMES = {
    DISCOVER: "discover",
    OFFER: "offer",
    REQUEST: "request",
    DECLINE: "decline",
    ACK: "ack",
    NAK: "nak",
    RELEASE: "release",
    INFORM: "inform",
}

# option codes used by name
OPT_PAD = 0
OPT_SUBNET_MASK = 1
OPT_ROUTER = 3
OPT_DNS = 6
OPT_HOSTNAME = 12
OPT_DOMAIN = 15
OPT_REQUESTED_IP = 50
OPT_LEASE_TIME = 51
OPT_OVERLOAD = 52
OPT_MESSAGE_TYPE = 53
OPT_SERVER_ID = 54
OPT_PARAM_REQUEST = 55
OPT_MESSAGE = 56
OPT_MAX_SIZE = 57
OPT_RENEWAL = 58
OPT_REBINDING = 59
OPT_CLIENT_ID = 61
OPT_CAPTIVE_PORTAL = 114
OPT_END = 255

ZERO_IP = "0.0.0.0"
_ZERO4 = b"\0\0\0\0"
_ntoa = socket.inet_ntoa
_aton = socket.inet_aton


class DecodeError(ValueError):
    """A packet that is not a well-formed DHCP message; `reason` names why."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(slots=True)
class Message:
    """One DHCP message, canonical: addresses dotted, options concatenated, no 52."""

    op: int = BOOTREQUEST
    htype: int = 1
    hlen: int = 6
    hops: int = 0
    xid: int = 0
    secs: int = 0
    flags: int = 0
    ciaddr: str = ZERO_IP
    yiaddr: str = ZERO_IP
    siaddr: str = ZERO_IP
    giaddr: str = ZERO_IP
    chaddr: bytes = bytes(16)
    sname: bytes = bytes(64)
    file: bytes = bytes(128)
    options: dict[int, bytes] = field(default_factory=dict)
    # the options already in wire form (end included), when a sender caches them;
    # must encode `options` exactly, encode uses it as is
    wire: bytes | None = field(default=None, compare=False, repr=False)

    # -- convenience views the server uses ------------------------------------
    @property
    def message_type(self) -> int | None:
        v = self.options.get(OPT_MESSAGE_TYPE)
        return v[0] if v else None

    @property
    def mac(self) -> str:
        return self.chaddr[: self.hlen].hex(":")

    @property
    def broadcast(self) -> bool:
        return bool(self.flags & BROADCAST_FLAG)

    def ip_option(self, code: int) -> str | None:
        v = self.options.get(code)
        return _ntoa(v) if v is not None and len(v) == 4 else None

    @property
    def requested_ip(self) -> str | None:
        return self.ip_option(OPT_REQUESTED_IP)

    @property
    def server_id(self) -> str | None:
        return self.ip_option(OPT_SERVER_ID)

    @property
    def client_key(self) -> bytes:
        """Who the client is (RFC 2131 4.2): option 61 when sent, else htype + chaddr.

        With option 61 the key holds chaddr too: a client identifier is no secret (it
        is broadcast), so it must not let another hardware address take over a lease.
        """
        cid = self.options.get(OPT_CLIENT_ID)
        if cid:
            return client_key(cid, self.chaddr[: self.hlen])
        return bytes((self.htype,)) + self.chaddr[: self.hlen]

    @property
    def max_size(self) -> int:
        v = self.options.get(OPT_MAX_SIZE)
        if v is not None and len(v) == 2:
            return max(576, int.from_bytes(v, "big"))
        return 576


def client_key(client_id: bytes | None, hwaddr: bytes, htype: int = 1) -> bytes:
    """The index key of a client: 0xff + chaddr + option 61, or htype + chaddr without 61.

    0xff never starts the second form (only Ethernet, htype 1, is served)."""
    if client_id:
        return b"\xff" + hwaddr + client_id
    return bytes((htype,)) + hwaddr


def _walk(data: bytes, start: int, end: int, out: dict[int, bytes], where: str) -> None:
    """Append the options of data[start:end] to out (RFC 3396 concatenation)."""
    i = start
    while i < end:
        code = data[i]
        if code == OPT_END:
            return
        if code == OPT_PAD:
            i += 1
            continue
        if i + 1 >= end:
            raise DecodeError("option_overrun", f"option {code} has no length in {where}")
        n = data[i + 1]
        j = i + 2 + n
        if j > end:
            raise DecodeError("option_overrun", f"option {code} runs past the end of {where}")
        value = data[i + 2 : j]
        prev = out.get(code)
        out[code] = value if prev is None else prev + value
        i = j


def decode(data: bytes) -> Message:
    """Parse one datagram; raises DecodeError (only) on anything malformed."""
    if len(data) < HEADER_LEN:
        raise DecodeError("truncated", f"{len(data)} bytes, a DHCP message has at least 240")
    (op, htype, hlen, hops, xid, secs, flags, ci, yi, si, gi, chaddr, sname, file, cookie) = (
        HEADER.unpack_from(data)
    )
    if cookie != MAGIC:
        raise DecodeError("bad_cookie", f"magic cookie {cookie:#010x}")
    if hlen > 16:
        raise DecodeError("bad_hlen", f"hlen {hlen} > 16")
    options: dict[int, bytes] = {}
    _walk(data, HEADER_LEN, len(data), options, "options")
    overload = options.pop(OPT_OVERLOAD, None)
    if overload is not None:
        if len(overload) != 1 or overload[0] not in (1, 2, 3):
            raise DecodeError("bad_overload", f"option 52 value {overload.hex()}")
        # RFC 3396 order: options field, then file, then sname
        if overload[0] & 1:
            _walk(file, 0, len(file), options, "file")
            file = bytes(128)
        if overload[0] & 2:
            _walk(sname, 0, len(sname), options, "sname")
            sname = bytes(64)
        options.pop(OPT_OVERLOAD, None)
    return Message(
        op,
        htype,
        hlen,
        hops,
        xid,
        secs,
        flags,
        _ntoa(ci),
        _ntoa(yi),
        _ntoa(si),
        _ntoa(gi),
        chaddr,
        sname,
        file,
        options,
    )


_DATA_CODES = frozenset(range(1, 255)) - {OPT_OVERLOAD}


def _chunks(options: dict[int, bytes]) -> list[bytes]:
    """Each option as code+len+value pieces; values over 255 bytes split (RFC 3396)."""
    out = []
    for code, value in options.items():
        if code not in _DATA_CODES:
            raise ValueError(f"option {code} cannot be encoded as data")
        n = len(value)
        if n <= 255:
            out.append(bytes((code, n)) + value)
            continue
        for k in range(0, n, 255):
            piece = value[k : k + 255]
            out.append(bytes((code, len(piece))) + piece)
    return out


def _fill(chunks: list[bytes], room: int) -> tuple[bytes, list[bytes]]:
    """Take chunks in order while they fit in `room` bytes (leaving one for end)."""
    taken = []
    used = 0
    while chunks and used + len(chunks[0]) <= room - 1:
        c = chunks.pop(0)
        taken.append(c)
        used += len(c)
    return b"".join(taken), chunks


def _ip(text: str) -> bytes:
    return _ZERO4 if text == ZERO_IP else _aton(text)


def options_wire(options: dict[int, bytes]) -> bytes:
    """The options in wire form with the end option, for `Message.wire`."""
    return b"".join(_chunks(options)) + b"\xff"


def encode(msg: Message, max_size: int = 576) -> bytes:
    """The canonical wire form: options, then end, padded to 300 bytes.

    `max_size` is the largest DHCP message (IP datagram) the peer accepts; when the
    options do not fit it, the file and then sname fields carry the rest (option 52).
    """
    sname, file = msg.sname, msg.file
    room = max(max_size, 576) - 28 - HEADER_LEN  # IP and UDP headers, header and cookie
    wire = msg.wire
    if wire is not None and len(wire) <= room:
        body = wire[:-1]
    else:
        chunks = _chunks(msg.options)
        body = b"".join(chunks)
    if len(body) + 1 > room:
        main, rest = _fill(chunks, room - 3)  # 3 bytes for option 52
        # only fields that carry nothing else may carry options
        in_file, rest = _fill(rest, 128) if not any(file) else (b"", rest)
        in_sname, rest = _fill(rest, 64) if not any(sname) else (b"", rest)
        flag = (1 if in_file else 0) | (2 if in_sname else 0)
        if rest or not flag:  # does not fit even overloaded: send it whole
            main = body
        else:
            main += bytes((OPT_OVERLOAD, 1, flag))
            if in_file:
                file = (in_file + b"\xff").ljust(128, b"\0")
            if in_sname:
                sname = (in_sname + b"\xff").ljust(64, b"\0")
        body = main
    head = HEADER.pack(
        msg.op,
        msg.htype,
        msg.hlen,
        msg.hops,
        msg.xid,
        msg.secs,
        msg.flags,
        _ip(msg.ciaddr),
        _ip(msg.yiaddr),
        _ip(msg.siaddr),
        _ip(msg.giaddr),
        msg.chaddr,
        sname,
        file,
        MAGIC,
    )
    out = head + body + b"\xff"
    if len(out) < MIN_REPLY:
        out += bytes(MIN_REPLY - len(out))
    return out
