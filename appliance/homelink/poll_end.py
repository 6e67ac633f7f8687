"""One end of a long-poll link, as the code written for a WebSocket sees it.

The relay, the agent and the dialer read and write a link through a few methods of
a websockets connection: `send`, `recv`, `async for`, `close(code, reason)`,
`wait_closed`, and they catch `ConnectionClosed`.  `PollEnd` gives a long-poll
session those same methods over the sans-IO `Outbox` and `Inbox` of poll.py; the
relay's session and the client add how the bytes travel.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator

from websockets.exceptions import ConnectionClosed, ConnectionClosedError, ConnectionClosedOK
from websockets.frames import Close

from appliance.homelink.poll import (
    HIGH_WATER,
    Inbox,
    Message,
    MessageKind,
    Outbox,
    close_message,
    of_value,
    parse_close,
)

CLOSE_WAIT = 2.0  # how long close() waits for the peer to take the close message
CLOSE_ABNORMAL = 1006  # the code a WebSocket reports when no close frame came
OK_CODES = (1000, 1001)


class PollEnd:
    """Ordered messages both ways and a close with a code, like a WebSocket."""

    def __init__(self) -> None:
        self.outbox = Outbox()
        self.inbox = Inbox()
        self._received: deque[Message] = deque()
        self.received_bytes = 0
        self._readable = asyncio.Event()  # a message waits, or the end is closed
        self._writable = asyncio.Event()  # the outbox is below its high water
        self._writable.set()
        self._unsent = asyncio.Event()  # the outbox has something to send
        self._taken = asyncio.Event()  # the received queue shrank
        self._closed = asyncio.Event()
        self._rcvd: Close | None = None  # the peer's close
        self._sent: Close | None = None  # ours
        self._rcvd_first = False  # the peer closed before we did

    # -- what the link's users call ----------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    async def send(self, message: str | bytes) -> None:
        if self.closed or self.outbox.closed:
            raise self._exception()
        self.outbox.push(of_value(message))
        self._unsent.set()
        while self.outbox.kept_bytes > HIGH_WATER and not self.closed:
            self._writable.clear()
            await self._writable.wait()
        if self.closed and not self.outbox.done:  # it may never arrive: as websockets
            raise self._exception()

    async def recv(self) -> str | bytes:
        while not self._received:
            if self.closed:
                raise self._exception()
            self._readable.clear()
            await self._readable.wait()
        message = self._received.popleft()
        self.received_bytes -= message.size
        self._taken.set()
        return message.value()

    def __aiter__(self) -> AsyncIterator[str | bytes]:
        return self._messages()

    async def _messages(self) -> AsyncIterator[str | bytes]:
        while True:
            try:
                yield await self.recv()
            except ConnectionClosedOK:
                return

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Send the close and wait (a bounded time) until the peer has it."""
        if self.closed:
            return
        self._queue_close(code, reason)
        try:
            await asyncio.wait_for(self._closed.wait(), CLOSE_WAIT)
        except TimeoutError:
            self.finish()  # never acknowledged: the close is not clean

    def end(self, code: int, reason: str = "") -> None:
        """Close now without waiting; the close message still goes to the peer if it
        polls again (the relay's session lingers to deliver it)."""
        if not self.closed:
            self._queue_close(code, reason)
            self.finish()

    def _queue_close(self, code: int, reason: str) -> None:
        if not self.outbox.closed:
            self._sent = Close(code, reason)
            self.outbox.push(close_message(code, reason))
            self._unsent.set()

    async def wait_closed(self) -> None:
        await self._closed.wait()

    # -- what the transport calls ------------------------------------------------------

    def received(self, messages: list[Message]) -> None:
        """Messages in order from the peer (a close among them ends the end)."""
        for m in messages:
            if self.closed:
                return
            if m.kind is MessageKind.CLOSE:
                code, reason = parse_close(m)
                self._rcvd = Close(code, reason)
                self._rcvd_first = self._sent is None
                self.finish()
                return
            self._received.append(m)
            self.received_bytes += m.size
        self._readable.set()

    def acknowledged(self, n: int) -> None:
        """The peer holds every message below n."""
        self.outbox.ack(n)
        if self.outbox.kept_bytes <= HIGH_WATER:
            self._writable.set()
        if self.outbox.done:  # our close arrived: as good as the peer's echo of it
            self._rcvd = self._rcvd or self._sent
            self.finish()

    def finish(self, code: int | None = None, reason: str = "") -> None:
        """The end is over (a close either way, or the transport gave up with `code`)."""
        if self.closed:
            return
        if code is not None and self._rcvd is None and self._sent is None:
            self._sent = Close(code, reason)
        self._closed.set()
        self._readable.set()
        self._writable.set()
        self._unsent.set()
        self._taken.set()
        self.ended()

    def ended(self) -> None:
        """Hook: the end just closed (the relay forgets the session)."""

    def _exception(self) -> ConnectionClosed:
        """As websockets decides: clean only when a close with 1000 or 1001 was received
        (or ours acknowledged) and what we sent, if anything, was one too."""
        rcvd, sent = self._rcvd, self._sent
        ok = rcvd is not None and rcvd.code in OK_CODES and (sent is None or sent.code in OK_CODES)
        cls = ConnectionClosedOK if ok else ConnectionClosedError
        return cls(rcvd, sent, None if rcvd is None or sent is None else self._rcvd_first)
