"""One end's link to a relay: streams multiplexed on a WebSocket that is kept up.

The asyncio layer around the sans-IO `Stream`: a `Link` owns one WebSocket at a
time (made by the `dial` coroutine it is given), feeds every binary message to the
stream its token names, and writes whatever the streams have due.  When the
WebSocket dies the streams stay (`Stream.link_lost`); the link dials again with
exponential backoff and full jitter, and on the new WebSocket every open stream
sends its RESUME (docs/home-relay.md, "Resume").  The agent and the appliance's
dialer run the same code: the agent passes `register` (the relay's challenge) and
`accept` (what to do with an OPEN); the appliance calls `open`.

`LinkStream` is one stream as the local side sees it: `write` waits for window
room, `read` waits for bytes, and `bridge` joins it to an asyncio socket pair.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import secrets
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Protocol

from websockets.exceptions import WebSocketException

from appliance.homelink import frames
from appliance.homelink.frames import Frame, FrameError, Kind, Reset
from appliance.homelink.stream import LINGER, WINDOW, Stream

log = logging.getLogger(__name__)


class LinkConnection(Protocol):
    """A link as its users see it: a websockets connection, or a long-poll session that
    behaves as one (poll_end.py); both raise websockets' ConnectionClosed when over."""

    async def send(self, message: str | bytes) -> None: ...

    async def recv(self) -> str | bytes: ...

    def __aiter__(self) -> AsyncIterator[str | bytes]: ...

    async def close(self, code: int = 1000, reason: str = "") -> None: ...


Dial = Callable[[], Awaitable[LinkConnection]]
Register = Callable[[LinkConnection], Awaitable[None]]
Accept = Callable[["LinkStream"], Awaitable[None]]

BACKOFF_FIRST = 0.5
BACKOFF_CAP = 15.0
STEADY = 10.0  # a WebSocket that stayed up this long resets the backoff
TICK = 0.05  # acknowledgements of idle streams, linger expiry
FRAMES_PER_TURN = 4  # a stream's share of the WebSocket before the next stream's turn
READ_CHUNK = frames.MAX_PAYLOAD
MAX_FINISHED = 4096  # ended streams remembered for a linger (a few hundred bytes each)


class LinkDown(Exception):
    """The relay could not be reached, or refused the registration (a close code)."""


class LinkStream:
    """One stream on a link, for the local side: bytes in, bytes out, an end."""

    def __init__(self, link: Link, stream: Stream, held: bool, source: str = "") -> None:
        self.link = link
        self.stream = stream
        self.held = held  # the local side is up (an accepted stream: once `hold` is called)
        self._source = source
        self._changed = asyncio.Event()

    @property
    def source(self) -> str:
        """An accepted stream: who opened it, as the relay saw it ("" from an old relay)."""
        return self._source

    @property
    def token(self) -> bytes:
        return self.stream.token

    @property
    def opened(self) -> bool:
        """The peer holds the stream: any frame of it arrived (the agent's ACK 0)."""
        return self.stream.last_heard is not None and self.stream.reset_code is None

    def _wake(self) -> None:
        self._changed.set()

    async def _wait(self) -> None:
        await self._changed.wait()
        self._changed.clear()

    def hold(self) -> None:
        """The local side of an accepted stream is up: answer the OPEN (ACK 0)."""
        self.held = True
        self.stream.ack_now()
        self.link.due(self)

    async def wait_opened(self, timeout: float) -> Reset | None:
        """None once the peer holds the stream; else why not (RESET code, or EXPIRED)."""
        try:
            async with asyncio.timeout(timeout):
                while not self.opened and self.stream.reset_code is None:
                    await self._wait()
        except TimeoutError:
            self.abort(Reset.CLOSED, "no answer to OPEN")
            return Reset.EXPIRED
        return self.stream.reset_code

    async def write(self, data: bytes) -> None:
        """Queue bytes, waiting for window room; raises ConnectionResetError once reset."""
        view = memoryview(data)
        while view:
            if self.stream.reset_code is not None:
                raise ConnectionResetError(f"stream reset: {self.stream.reset_code.name}")
            room = self.stream.send_room()
            if room <= 0:
                await self._wait()
                continue
            self.stream.send(view[:room])
            view = view[room:]
            self.link.due(self)

    def close(self) -> None:
        """Our direction ends (FIN after the queued bytes)."""
        if self.stream.reset_code is None:
            self.stream.close_local()
            self.link.due(self)

    def abort(self, code: Reset = Reset.CLOSED, reason: str = "") -> None:
        self.stream.abort(code, reason)
        self.link.due(self)

    async def read(self) -> bytes:
        """The next bytes from the peer; b"" at its FIN; ConnectionResetError on reset.

        The bytes count as delivered (and get acknowledged) once returned: call it
        again only after writing them out, which is what holds the peer at the window.
        """
        while True:
            data = self.stream.readable()
            if data:
                self.stream.delivered(len(data))
                self.link.due(self)
                return data
            if self.stream.eof_received:
                self.stream.ack_now()
                self.link.due(self)
                return b""
            if self.stream.reset_code is not None:
                raise ConnectionResetError(f"stream reset: {self.stream.reset_code.name}")
            await self._wait()

    async def bridge(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Carry bytes between a local socket and the stream until both directions end."""

        async def upstream() -> None:
            while chunk := await reader.read(READ_CHUNK):
                await self.write(chunk)
            self.close()

        async def downstream() -> None:
            while data := await self.read():
                writer.write(data)
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()

        up = asyncio.ensure_future(upstream())
        down = asyncio.ensure_future(downstream())
        try:
            done, _ = await asyncio.wait((up, down), return_when=asyncio.FIRST_EXCEPTION)
            failed = [t for t in done if t.exception() is not None]
            if failed:
                raise failed[0].exception()  # type: ignore[misc]
            await asyncio.gather(up, down)
        except (ConnectionError, OSError) as exc:
            log.debug("stream %s ends: %s", self.token.hex()[:8], exc)
            self.abort(Reset.CLOSED, "local connection failed")
        finally:
            for task in (up, down):
                task.cancel()
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


class Link:
    """Streams to one relay over a WebSocket that is dialled again whenever it dies."""

    def __init__(
        self,
        dial: Dial,
        *,
        name: str = "relay",
        register: Register | None = None,
        accept: Accept | None = None,
        window: int = WINDOW,
        linger: float = LINGER,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.dial = dial
        self.name = name
        self.register = register
        self.accept = accept
        self.window = window
        self.linger = linger
        self.clock = clock
        self.streams: dict[bytes, LinkStream] = {}
        self.up = asyncio.Event()  # a WebSocket is open (and registered)
        self.counters: dict[str, int] = {
            "links": 0,
            "link_failures": 0,
            "bad_frames": 0,
            "unknown_streams": 0,
            "streams_expired": 0,
        }
        self._ws: LinkConnection | None = None
        self._due: dict[LinkStream, None] = {}  # insertion-ordered set: round robin
        # streams that ended cleanly, for a linger: the peer may not have heard our last
        # ACK and RESUMEs (oldest first, at most MAX_FINISHED)
        self._finished: dict[bytes, tuple[LinkStream, float]] = {}
        self._control: deque[bytes] = deque()  # OPENs and answers to unknown tokens
        self._wake_writer = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self.last_error = ""

    # -- for the local side ----------------------------------------------------

    def open(self, household: str) -> LinkStream:
        """A new stream to `household` (appliance side): OPEN now or on the next link."""
        stream = Stream(secrets.token_bytes(frames.TOKEN_LEN), household, self.window, self.linger)
        ls = LinkStream(self, stream, held=True)
        self.streams[stream.token] = ls
        self._control.append(frames.encode_open(stream.token, household))
        self._wake_writer.set()
        return ls

    def due(self, ls: LinkStream) -> None:
        """`ls` may have frames to send."""
        self._due[ls] = None
        self._wake_writer.set()

    # -- the loop ----------------------------------------------------------------

    async def run(self) -> None:
        """Keep a WebSocket up forever (until cancelled), with backoff between tries."""
        failures = 0
        ticker = asyncio.ensure_future(self._ticker())
        try:
            while True:
                started = self.clock()
                try:
                    await self._one_link()
                except (OSError, TimeoutError, WebSocketException, LinkDown) as exc:
                    # (WebSocketException: a closed link, and every refused handshake: a
                    # 429 from the relay, a 502 from a load balancer, a proxy's refusal)
                    self.last_error = str(exc) or type(exc).__name__
                    self.counters["link_failures"] += 1
                    log.info("link to %s: %s", self.name, self.last_error)
                except Exception as exc:  # a bug must not end the link for good
                    self.last_error = f"{type(exc).__name__}: {exc}"
                    self.counters["link_failures"] += 1
                    log.exception("link to %s failed", self.name)
                if self.clock() - started >= STEADY:
                    failures = 0
                failures += 1
                cap = min(BACKOFF_CAP, BACKOFF_FIRST * 2 ** (failures - 1))
                await asyncio.sleep(random.uniform(0, cap))
        finally:
            ticker.cancel()
            for task in list(self._tasks):
                task.cancel()

    async def _one_link(self) -> None:
        ws = await self.dial()
        try:
            if self.register is not None:
                await self.register(ws)
            self._attach(ws)
            tasks = (
                asyncio.ensure_future(self._reader(ws)),
                asyncio.ensure_future(self._writer(ws)),
            )
            try:
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in tasks:
                    task.cancel()
            for task in done:
                if task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
        finally:
            self._detach(ws)
            await ws.close()

    def _attach(self, ws: LinkConnection) -> None:
        self._ws = ws
        self.counters["links"] += 1
        for ls in self.streams.values():
            ls.stream.link_restored()
            self._due[ls] = None
        self.up.set()
        self._wake_writer.set()
        log.info("link to %s up, %d streams to resume", self.name, len(self.streams))

    def _detach(self, ws: LinkConnection) -> None:
        if self._ws is not ws:
            return
        self._ws = None
        self.up.clear()
        now = self.clock()
        for ls in self.streams.values():
            ls.stream.link_lost(now)
        # OPENs not yet sent go out on the next link; answers to unknown tokens do not.
        self._control = deque(c for c in self._control if c[0] == Kind.OPEN)

    async def _reader(self, ws: LinkConnection) -> None:
        async for message in ws:
            try:
                frame = frames.decode(message)
            except FrameError as exc:
                self.counters["bad_frames"] += 1
                raise LinkDown(f"bad frame from the relay: {exc}") from exc
            self._receive(frame)

    def _receive(self, frame: Frame) -> None:
        ls = self.streams.get(frame.token)
        if ls is None and frame.token in self._finished:
            # a stream that ended cleanly here, but the peer did not hear our last ACK
            # (the link broke): it answers the peer's RESUME or FIN as it did then
            ls = self._finished[frame.token][0]
            ls.stream.receive(frame, self.clock())
            self.due(ls)
            return
        if ls is None:
            if frame.kind is Kind.OPEN and self.accept is not None:
                ls = self._accepted(frame)
            elif frame.kind is Kind.RESUME:
                self.counters["unknown_streams"] += 1
                self._control.append(
                    frames.encode_reset(frame.token, Reset.UNKNOWN, "no such stream")
                )
                self._wake_writer.set()
                return
            else:
                return  # a late frame of a stream that ended here
        if frame.kind is Kind.OPEN:
            return  # a repeated OPEN (it was resent on a new link): the stream exists
        ls.stream.receive(frame, self.clock())
        ls._wake()
        self.due(ls)

    def _accepted(self, frame: Frame) -> LinkStream:
        stream = Stream(frame.token, frame.household, self.window, self.linger)
        stream.last_heard = self.clock()
        ls = LinkStream(self, stream, held=False, source=frame.source)
        self.streams[frame.token] = ls
        assert self.accept is not None
        task = asyncio.ensure_future(self._run_accept(ls))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return ls

    async def _run_accept(self, ls: LinkStream) -> None:
        assert self.accept is not None
        try:
            await self.accept(ls)
        except Exception:
            log.exception("stream %s: the local side failed", ls.token.hex()[:8])
            ls.abort(Reset.CLOSED, "local side failed")

    async def _writer(self, ws: LinkConnection) -> None:
        while True:
            await self._wake_writer.wait()
            self._wake_writer.clear()
            while self._control:
                await ws.send(self._control.popleft())
            while self._due:
                for ls in list(self._due):
                    out = ls.stream.frames_to_send(FRAMES_PER_TURN)
                    if len(out) < FRAMES_PER_TURN:
                        self._due.pop(ls, None)
                    for frame in out:
                        await ws.send(frame)
                    if ls.stream.done:
                        self._forget(ls)
                while self._control:
                    await ws.send(self._control.popleft())

    def _forget(self, ls: LinkStream) -> None:
        self.streams.pop(ls.token, None)
        self._due.pop(ls, None)
        ls._wake()
        if ls.stream.reset_code is None:  # ended cleanly: kept a linger, bounded
            self._finished[ls.token] = (ls, self.clock())
            while len(self._finished) > MAX_FINISHED:
                del self._finished[next(iter(self._finished))]

    async def _ticker(self) -> None:
        """Acknowledge what idle streams delivered; expire streams past their linger."""
        while True:
            await asyncio.sleep(TICK)
            now = self.clock()
            while self._finished:
                token, (_, ended) = next(iter(self._finished.items()))
                if now - ended < self.linger:
                    break
                del self._finished[token]
            for ls in list(self.streams.values()):
                stream = ls.stream
                if stream.expired(now):
                    self.counters["streams_expired"] += 1
                    ls._wake()
                    if self._ws is None:
                        self._forget(ls)  # nobody to tell
                        continue
                if ls.held:
                    stream.ack_now()
                    stream.keepalive(now)
                    self.due(ls)
