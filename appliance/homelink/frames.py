"""The frames on a relay link: one WebSocket binary message is one frame.

Sans-IO: `encode_*` build bytes, `decode` turns bytes into a typed frame or raises
`FrameError` (a counted close for whoever reads it, never a crash).  Every frame
names its stream by a 16-byte random token that the appliance picks when it opens
the stream; the token, not the link, is the stream's identity, so a stream outlives
the link it started on and resumes on another (docs/home-relay.md).

    type u8 | flags u8 | stream token (16 bytes) | body

The body of DATA, ACK, FIN and RESUME starts with a big-endian u64 byte offset in
the direction of the frame's sender (ACK and RESUME: in the direction towards it).
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from enum import IntEnum

TOKEN_LEN = 16
MAX_PAYLOAD = 262144  # bytes of stream data in one DATA frame (a quarter window)
MAX_REASON = 200  # bytes of UTF-8 in a RESET reason
HEADER = struct.Struct("!BB16s")
OFFSET = struct.Struct("!Q")
MAX_FRAME = HEADER.size + OFFSET.size + MAX_PAYLOAD  # the longest valid frame
MAX_OFFSET = 2**63 - 1

# A household name is one DNS label, lower case: it is the first label of the name a
# visitor types (alice-home.relay.example), so it must be one.
HOUSEHOLD_RE = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")  # use with fullmatch


class Kind(IntEnum):
    OPEN = 1  # appliance -> relay -> agent: a new stream to a household (body: household)
    DATA = 2  # either way: offset, then bytes
    ACK = 3  # either way: every byte below offset was delivered; the sender may drop them
    FIN = 4  # either way: the sender's direction ends at offset (its total length)
    RESET = 5  # either way, or from the relay: the stream is over (body: code, reason)
    RESUME = 6  # after a new link: offset received so far, household (flag: answer wanted)


class Reset(IntEnum):
    """Why a stream ended abnormally; the code travels, the text is for logs."""

    OFFLINE = 1  # the household is not registered (or not online long enough)
    LIMIT = 2  # a limit of the relay or of an end (streams per household, bytes)
    REFUSED = 3  # the agent could not carry it (its local service did not answer)
    EXPIRED = 4  # an end waited longer than its linger time for the link to come back
    PROTOCOL = 5  # a frame broke the protocol (offset beyond what was sent, ...)
    UNKNOWN = 6  # a resume for a stream nobody holds
    CLOSED = 7  # an end gave up on it (its local side failed)


FLAG_ANSWER = 0x01  # RESUME: the receiver answers with its own RESUME


class FrameError(ValueError):
    """A frame that is not one: the link that sent it is closed and counted."""


@dataclass(frozen=True, slots=True)
class Frame:
    kind: Kind
    token: bytes
    offset: int = 0  # DATA, ACK, FIN, RESUME
    payload: bytes = b""  # DATA
    household: str = ""  # OPEN, RESUME
    code: Reset | None = None  # RESET
    reason: str = ""  # RESET
    answer: bool = False  # RESUME
    source: str = ""  # OPEN, relay -> agent: the appliance link's source address


def _head(kind: Kind, token: bytes, flags: int = 0) -> bytes:
    if len(token) != TOKEN_LEN:
        raise ValueError("a stream token is 16 bytes")
    return HEADER.pack(kind, flags, token)


SOURCE_RE = re.compile(r"[0-9A-Za-z.:\[\]-]{1,64}")  # an address, as the relay saw it


def encode_open(token: bytes, household: str, source: str = "") -> bytes:
    """OPEN from an appliance names the household; the relay, passing it on to the
    agent, adds the appliance link's source address, so the agent's per-source brakes
    tell relayed appliances apart (they all reach its API from loopback)."""
    head = _head(Kind.OPEN, token) + _household_bytes(household)
    if not source:
        return head
    if not SOURCE_RE.fullmatch(source):
        raise ValueError(f"not a source address: {source!r}")
    return head + b"\0" + source.encode("ascii")


def encode_data(token: bytes, offset: int, payload: bytes | memoryview) -> bytes:
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"a DATA frame carries at most {MAX_PAYLOAD} bytes")
    return b"".join((_head(Kind.DATA, token), OFFSET.pack(offset), payload))


def encode_ack(token: bytes, offset: int) -> bytes:
    return _head(Kind.ACK, token) + OFFSET.pack(offset)


def encode_fin(token: bytes, offset: int) -> bytes:
    return _head(Kind.FIN, token) + OFFSET.pack(offset)


def encode_reset(token: bytes, code: Reset, reason: str = "") -> bytes:
    text = reason.encode("utf-8", "replace")[:MAX_REASON].decode("utf-8", "ignore")
    return _head(Kind.RESET, token) + bytes((code,)) + text.encode("utf-8")


def encode_resume(token: bytes, received: int, household: str, answer: bool) -> bytes:
    flags = FLAG_ANSWER if answer else 0
    return _head(Kind.RESUME, token, flags) + OFFSET.pack(received) + _household_bytes(household)


def _household_bytes(household: str) -> bytes:
    if not HOUSEHOLD_RE.fullmatch(household):
        raise ValueError(f"not a household name: {household!r}")
    return household.encode("ascii")


def _offset(body: bytes | memoryview) -> int:
    if len(body) < OFFSET.size:
        raise FrameError("frame too short for its offset")
    (value,) = OFFSET.unpack_from(body)
    if value > MAX_OFFSET:
        raise FrameError("offset out of range")
    return int(value)


def _household(body: bytes | memoryview) -> str:
    try:
        name = bytes(body).decode("ascii")
    except UnicodeDecodeError:
        raise FrameError("household name is not ASCII") from None
    if not HOUSEHOLD_RE.fullmatch(name):
        raise FrameError("not a household name")
    return name


def decode(message: bytes | memoryview | str) -> Frame:
    """One received WebSocket message as a frame; `FrameError` for anything else."""
    if isinstance(message, str):
        raise FrameError("text message where a frame was expected")
    if len(message) < HEADER.size:
        raise FrameError("frame shorter than its header")
    if len(message) > MAX_FRAME:
        raise FrameError("frame longer than the longest valid one")
    kind_value, flags, token = HEADER.unpack_from(message)
    try:
        kind = Kind(kind_value)
    except ValueError:
        raise FrameError(f"unknown frame type {kind_value}") from None
    body = memoryview(message)[HEADER.size :]
    if kind is Kind.OPEN:
        name, sep, source = bytes(body).partition(b"\0")
        text = source.decode("ascii", "replace")
        if sep and not SOURCE_RE.fullmatch(text):
            raise FrameError("OPEN with a malformed source")
        return Frame(kind, token, household=_household(name), source=text)
    if kind is Kind.DATA:
        return Frame(kind, token, offset=_offset(body), payload=bytes(body[OFFSET.size :]))
    if kind in (Kind.ACK, Kind.FIN):
        if len(body) != OFFSET.size:
            raise FrameError("ACK and FIN carry an offset only")
        return Frame(kind, token, offset=_offset(body))
    if kind is Kind.RESET:
        if not body:
            raise FrameError("RESET without a code")
        try:
            code = Reset(body[0])
        except ValueError:
            raise FrameError(f"unknown reset code {body[0]}") from None
        if len(body) - 1 > MAX_REASON:
            raise FrameError("reset reason too long")
        reason = bytes(body[1:]).decode("utf-8", "replace")
        return Frame(kind, token, code=code, reason=reason)
    # RESUME
    return Frame(
        kind,
        token,
        offset=_offset(body),
        household=_household(body[OFFSET.size :]),
        answer=bool(flags & FLAG_ANSWER),
    )
