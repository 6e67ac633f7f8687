"""A link by HTTP long-poll, for paths where a WebSocket Upgrade is blocked (seed 004).

Some middleboxes pass HTTPS requests but not the Upgrade to WebSocket: a reverse
proxy or CDN in front of the relay that does not forward it, an inspecting proxy.
There a link is carried by ordinary POST requests on the relay's own port, and the
rest of the relay, the agent and the dialer see the same link: ordered, reliable
messages (frames, and the registration's text), closed with a code and a reason.
(docs/home-relay.md, "Long-poll links".)

    POST /v1/agent or /v1/appliance        -> 200, body: the session id (32 hex)
    POST /v1/poll/up    body: first u64 | messages     -> 200, body: next u64
    POST /v1/poll/down  body: next u64 (what I hold)   -> 200, body: first u64 | messages

The up and down requests name their session in a `Poll-Session` header, never in
the path, which fronts write to their access logs.

Each direction numbers its messages from 0.  An up request says the number of its
first message; the relay drops those it already has, so a request retried after a
lost answer delivers nothing twice, and answers the number it expects next.  A down
request says what the client holds; the relay drops what is below it and answers
from there, at once if it has messages, else after at most `HOLD` seconds with none.
A lost answer is asked again with the same number, so nothing is lost either.  A
session with no down request for `DEAD_AFTER` seconds is dead, as a WebSocket
without pongs is.

Sans-IO: the message codec, the `Outbox` a sender keeps until acknowledged and the
`Inbox` that orders what arrives; `PollError` for anything malformed.
"""

from __future__ import annotations

import re
import struct
from collections import deque
from dataclasses import dataclass
from enum import IntEnum

HOLD = 4.0  # a down request waits at most this long for a message
DEAD_AFTER = 10.0  # no down request for this long: the session is dead
REQUEST_TIMEOUT = HOLD + 5.0  # a client's request unanswered for this long failed
MAX_BODY = 1024 * 1024  # bytes in one request or answer body a receiver accepts
BATCH = 512 * 1024  # bytes a sender puts in one body: under nginx's 1 MiB client_max_body_size
HIGH_WATER = 2 * 1024 * 1024  # unacknowledged bytes a sender holds before send() waits
UP_PATH, DOWN_PATH = "/v1/poll/up", "/v1/poll/down"
SESSION_HEADER = "poll-session"
SESSION_RE = re.compile(r"[0-9a-f]{32}")  # use with fullmatch

NUMBER = struct.Struct("!Q")
MESSAGE = struct.Struct("!BI")
CLOSE_CODE = struct.Struct("!H")


class MessageKind(IntEnum):
    BINARY = 0  # a frame
    TEXT = 1  # the registration's JSON
    CLOSE = 2  # u16 code | UTF-8 reason: the link is over


class PollError(ValueError):
    """A body or a number that breaks the protocol: the session is closed."""


@dataclass(frozen=True)
class Message:
    kind: MessageKind
    payload: bytes

    @property
    def size(self) -> int:
        return MESSAGE.size + len(self.payload)

    def value(self) -> str | bytes:
        """What a WebSocket's recv() would give: str for text, bytes for a frame."""
        return self.payload.decode() if self.kind is MessageKind.TEXT else self.payload


def close_message(code: int, reason: str) -> Message:
    return Message(MessageKind.CLOSE, CLOSE_CODE.pack(code) + reason.encode()[:123])


def parse_close(message: Message) -> tuple[int, str]:
    if len(message.payload) < CLOSE_CODE.size:
        raise PollError("a close message without a code")
    (code,) = CLOSE_CODE.unpack_from(message.payload)
    return code, message.payload[CLOSE_CODE.size :].decode(errors="replace")


def of_value(data: str | bytes) -> Message:
    if isinstance(data, str):
        return Message(MessageKind.TEXT, data.encode())
    return Message(MessageKind.BINARY, bytes(data))


def encode_batch(first: int, messages: list[Message]) -> bytes:
    parts = [NUMBER.pack(first)]
    for m in messages:
        parts.append(MESSAGE.pack(m.kind, len(m.payload)))
        parts.append(m.payload)
    return b"".join(parts)


def decode_batch(body: bytes) -> tuple[int, list[Message]]:
    """`first u64 | (kind u8 | length u32 | payload)*` into its number and messages."""
    first = decode_number(body[: NUMBER.size])
    messages: list[Message] = []
    view = memoryview(body)
    at = NUMBER.size
    while at < len(body):
        if len(body) - at < MESSAGE.size:
            raise PollError("a truncated message header")
        kind, length = MESSAGE.unpack_from(body, at)
        at += MESSAGE.size
        try:
            mk = MessageKind(kind)
        except ValueError:
            raise PollError(f"unknown message kind {kind}") from None
        if length > len(body) - at:
            raise PollError("a message longer than the body")
        payload = bytes(view[at : at + length])
        if mk is MessageKind.TEXT:
            try:
                payload.decode()
            except UnicodeDecodeError:
                raise PollError("a text message that is not UTF-8") from None
        messages.append(Message(mk, payload))
        at += length
    return first, messages


def decode_number(body: bytes) -> int:
    if len(body) != NUMBER.size:
        raise PollError("not a u64")
    (n,) = NUMBER.unpack(body)
    return int(n)


class Outbox:
    """What one side sent, numbered from 0, kept until the other side says it has it.

    `batch()` takes the next unsent messages (about `BATCH` bytes), `ack(n)`
    forgets those below n, `rewind()` sends again from the first unacknowledged one
    (a request whose answer was lost)."""

    def __init__(self) -> None:
        self._kept: deque[Message] = deque()
        self.acked = 0  # number of the first kept message
        self._sent = 0  # number of the next message batch() gives
        self.kept_bytes = 0
        self.closed = False  # a close message was pushed: nothing more may follow

    @property
    def next(self) -> int:
        return self.acked + len(self._kept)

    @property
    def unsent(self) -> bool:
        return self._sent < self.next

    def push(self, message: Message) -> None:
        if self.closed:
            raise PollError("a message after the close")
        self._kept.append(message)
        self.kept_bytes += message.size
        if message.kind is MessageKind.CLOSE:
            self.closed = True

    def batch(self, limit: int = BATCH) -> tuple[int, list[Message]]:
        first = self._sent
        out: list[Message] = []
        size = NUMBER.size
        for i in range(first - self.acked, len(self._kept)):
            m = self._kept[i]
            if out and size + m.size > limit:
                break
            out.append(m)
            size += m.size
        self._sent = first + len(out)
        return first, out

    def ack(self, n: int) -> None:
        """The peer holds every message below n (n beyond what was sent: PollError)."""
        if n > self.next:
            raise PollError(f"acknowledged {n}, sent {self.next}")
        while self.acked < n:
            self.kept_bytes -= self._kept.popleft().size
            self.acked += 1
        self._sent = max(self._sent, self.acked)

    def rewind(self) -> None:
        self._sent = self.acked

    @property
    def done(self) -> bool:
        """Closed, and the peer has everything, the close too."""
        return self.closed and not self._kept


class Inbox:
    """Puts what arrives in order: repeats are dropped, a gap is a PollError."""

    def __init__(self) -> None:
        self.next = 0  # number of the next message wanted

    def accept(self, first: int, messages: list[Message]) -> list[Message]:
        if first > self.next:
            raise PollError(f"message {first} where {self.next} was due")
        fresh = messages[self.next - first :] if first < self.next else messages
        self.next += len(fresh)
        return fresh
