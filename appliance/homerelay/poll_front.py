"""The relay's long-poll links: sessions, and the HTTP that carries them on port 443.

websockets owns the relay's port and reads only GET requests.  `FrontConnection`
(the connection class websockets makes for each accepted socket) looks at the first
bytes: a GET is a WebSocket handshake and goes on as always; a POST is the long-poll
transport (appliance/homelink/poll.py), parsed by h11 here and answered by
`PollSessions`.  Each session is a `PollSession`, which the relay serves exactly as
a WebSocket link: same registration, same frames, same limits per source.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import h11
from websockets.asyncio.server import ServerConnection
from websockets.datastructures import Headers

from appliance.homelink import poll
from appliance.homelink.poll import HIGH_WATER, HOLD, PollError
from appliance.homelink.poll_end import CLOSE_ABNORMAL, PollEnd
from appliance.homerelay.heap import release_free_pages

log = logging.getLogger(__name__)

OPEN_TIMEOUT = 10.0  # a connection must say what it is (and a WebSocket shake) by then
REQUEST_BODY_TIMEOUT = 10.0  # a request's whole body must have come by then
DEAD = poll.DEAD_AFTER
CLOSE_LINGER = 2.0  # a closed poll connection whose TLS close has not ended is cut
GOING_AWAY = 0.5  # how long a closing relay waits for its sessions to hear so
KEEP_ALIVE = 30.0  # a poll connection idle this long between requests is closed
SWEEP = 1.0


@dataclass(frozen=True)
class _Request:
    """What the relay's handler reads of a WebSocket's request."""

    path: str
    headers: Headers


class PollSession(PollEnd):
    """One long-poll link at the relay."""

    def __init__(
        self,
        sid: str,
        path: str,
        remote: Any,
        forget: Callable[[str], None],
        headers: Headers | None = None,
    ) -> None:
        super().__init__()
        self.sid = sid
        self.request = _Request(path, headers if headers is not None else Headers())
        self.remote_address = remote
        self._forget = forget
        self.last_down = time.monotonic()
        self.downs = 0  # down requests waiting now
        self._generation = 0  # the newest down request; older ones answer empty

    def ended(self) -> None:
        # a close still to deliver keeps the session answering until it is
        # acknowledged or nobody polls (the sweep); with nothing to say it goes now
        if not self.outbox.closed:
            self._forget(self.sid)

    async def up(self, body: bytes) -> bytes:
        first, messages = poll.decode_batch(body)
        accepted = self.inbox.accept(first, messages)
        if not self.closed:
            self.received(accepted)
        # back-pressure: the next up request waits while the relay has not read these
        while self.received_bytes > HIGH_WATER and not self.closed:
            self._taken.clear()
            await self._taken.wait()
        return poll.NUMBER.pack(self.inbox.next)

    async def down(self, body: bytes) -> bytes:
        have = poll.decode_number(body)
        self.last_down = time.monotonic()
        self._generation += 1
        mine = self._generation
        self.downs += 1
        try:
            self.acknowledged(have)
            if self.outbox.done:
                self._forget(self.sid)  # the client has our close: nothing more to say
            self.outbox.rewind()  # what went out after `have` did not arrive
            if not self.outbox.unsent and not self.closed:
                self._unsent.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._unsent.wait(), HOLD)
            if mine != self._generation:
                return poll.encode_batch(have, [])  # a newer request asks for the same
            first, messages = self.outbox.batch()
            if self.outbox.closed and first + len(messages) == self.outbox.next:
                # our close goes out with this answer: the end is over for the relay
                # (the session still answers a retry of this request, see ended())
                asyncio.get_running_loop().call_soon(self.finish)
            return poll.encode_batch(first, messages)
        finally:
            self.downs -= 1
            self.last_down = time.monotonic()


Handler = Callable[[PollSession], Coroutine[Any, Any, None]]
Admit = Callable[[str], str | None]  # source -> None, or why it is refused (429)
SourceOf = Callable[[Any, Headers], str]  # (peer address, request headers) -> the source


class PollSessions:
    """The open sessions by id, and the answers to the transport's requests.

    `serve(session)` is the relay's link handler; `admit(source)` its per-source
    limit (called for each new session; the session counts until it closes), with
    the source as `source_of` tells it (sources.py)."""

    def __init__(
        self, paths: frozenset[str], serve: Handler, admit: Admit, source_of: SourceOf
    ) -> None:
        self.paths = paths
        self._serve = serve
        self._admit = admit
        self._source_of = source_of
        self.sessions: dict[str, PollSession] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._sweeper: asyncio.Task[None] | None = None
        self.counters = {"poll_sessions": 0, "poll_refused": 0, "poll_dead": 0}
        self.connections: set[Any] = set()  # the poll connections open now (their stop())

    def start(self) -> None:
        self._sweeper = asyncio.create_task(self._sweep_forever())

    async def close(self) -> None:
        """Say 1001 to every session, give their waiting down requests a moment to
        carry it (as websockets' close handshake, bounded), then end them all."""
        if self._sweeper is not None:
            self._sweeper.cancel()
        sessions = list(self.sessions.values())
        for session in sessions:
            session.end(1001, "relay going away")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(GOING_AWAY):
                while any(s.downs for s in sessions):
                    await asyncio.sleep(0.02)
        self.sessions.clear()
        for connection in list(self.connections):
            connection.stop()
        for task in list(self._tasks):
            task.cancel()

    async def answer(
        self, path: str, body: bytes, remote: Any, sid: str = "", headers: Headers | None = None
    ) -> tuple[int, bytes]:
        """(status, body) for a POST to `path` naming session `sid`."""
        if path in self.paths:
            headers = headers if headers is not None else Headers()
            refusal = self._admit(self._source_of(remote, headers))
            if refusal is not None:
                self.counters["poll_refused"] += 1
                return 429, refusal.encode()
            sid = secrets.token_hex(16)
            session = PollSession(sid, path, remote, self._forget, headers)
            self.sessions[sid] = session
            self.counters["poll_sessions"] += 1
            task = asyncio.create_task(self._serve(session))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            return 200, sid.encode()
        if path not in (poll.UP_PATH, poll.DOWN_PATH):
            return 404, b"not found\n"
        known = self.sessions.get(sid) if poll.SESSION_RE.fullmatch(sid) else None
        if known is None:
            return 404, b"no such session\n"
        try:
            if path == poll.UP_PATH:
                return 200, await known.up(body)
            return 200, await known.down(body)
        except PollError as exc:
            log.info("poll session %s: closed for a protocol error: %s", sid[:8], exc)
            known.finish(1002, "protocol error")
            self._forget(sid)
            return 400, f"{exc}\n".encode()

    def _forget(self, sid: str) -> None:
        self.sessions.pop(sid, None)

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(SWEEP)
            self.sweep(time.monotonic())

    def sweep(self, now: float) -> None:
        """A session whose client stopped polling is dead, as a link without pongs
        (a closed one that lingers to deliver its close is then forgotten)."""
        for session in list(self.sessions.values()):
            if session.downs == 0 and now - session.last_down > poll.DEAD_AFTER:
                if not session.closed:
                    self.counters["poll_dead"] += 1
                    log.info("poll session %s: no poll for %.0f s", session.sid[:8], DEAD)
                    session.finish(CLOSE_ABNORMAL, "no poll")
                self._forget(session.sid)


def front_connection(sessions: PollSessions) -> type[ServerConnection]:
    """The connection class to hand websockets' `serve(create_connection=...)`."""

    class FrontConnection(ServerConnection):
        """A GET goes to websockets as it came; a POST is answered by `sessions`."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            # made just before uvloop allocates the socket's TLS read buffer
            release_free_pages()
            super().__init__(*args, **kwargs)
            self._head = b""
            self._kind: asyncio.Future[str] = self.loop.create_future()
            self._h11: h11.Connection | None = None
            self._work = asyncio.Event()
            self._poll_task: asyncio.Task[None] | None = None

        def data_received(self, data: bytes) -> None:
            if self._h11 is not None:
                try:
                    self._h11.receive_data(data)
                except RuntimeError:  # bytes after the client's own end
                    self.transport.abort()
                self._work.set()
                return
            if self._kind.done():
                super().data_received(data)
                return
            self._head += data
            if len(self._head) < 5 and b"POST ".startswith(self._head):
                return  # not enough to tell yet
            if self._head.startswith(b"POST "):
                self._h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=16384)
                self._h11.receive_data(self._head)
                self._kind.set_result("poll")
                self._poll_task = self.loop.create_task(self._serve_poll())
            else:
                self._kind.set_result("websocket")
                super().data_received(self._head)
            self._head = b""

        def eof_received(self) -> None:
            if self._h11 is not None:
                with contextlib.suppress(RuntimeError):
                    self._h11.receive_data(b"")
                self._work.set()
                return
            super().eof_received()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._poll_task is not None:
                self._poll_task.cancel()
            super().connection_lost(exc)

        async def handshake(self, *args: Any, **kwargs: Any) -> None:
            try:
                async with asyncio.timeout(OPEN_TIMEOUT):
                    waiters: list[asyncio.Future[Any]] = [self._kind, self.connection_lost_waiter]
                    await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
                    if self._kind.done() and self._kind.result() == "websocket":
                        await super().handshake(*args, **kwargs)
                        return
            except TimeoutError:
                self.transport.abort()
                return
            # a poll connection: websockets' handler ends once it does
            await asyncio.shield(self.connection_lost_waiter)

        def stop(self) -> None:
            if self._poll_task is not None:
                self._poll_task.cancel()

        async def _serve_poll(self) -> None:
            sessions.connections.add(self)
            try:
                await self._poll_requests()
            except (h11.ProtocolError, TimeoutError):
                pass
            except Exception:
                log.exception("a poll connection failed")
            finally:
                sessions.connections.discard(self)
                self.transport.resume_reading()  # TLS's close needs the peer's close_notify
                self.transport.close()
                self.loop.call_later(CLOSE_LINGER, self._abort_if_open)

        def _abort_if_open(self) -> None:
            if not self.connection_lost_waiter.done():
                self.transport.abort()  # a peer that never finishes the TLS close

        async def _next_event(self, timeout: float) -> Any:
            assert self._h11 is not None
            async with asyncio.timeout(timeout):
                while True:
                    event = self._h11.next_event()
                    if event is not h11.NEED_DATA:
                        return event
                    self._work.clear()
                    await self._work.wait()

        async def _poll_requests(self) -> None:
            conn = self._h11
            assert conn is not None
            while True:
                event = await self._next_event(KEEP_ALIVE)
                if not isinstance(event, h11.Request):  # closed, paused, or garbage
                    return
                status, answer = await self._answer(event)
                keep = status == 200 and conn.their_state is h11.DONE
                headers = [
                    ("content-type", "application/octet-stream"),
                    ("content-length", str(len(answer))),
                    ("cache-control", "no-store"),
                ]
                if not keep:
                    headers.append(("connection", "close"))
                self.transport.write(conn.send(h11.Response(status_code=status, headers=headers)))
                self.transport.write(conn.send(h11.Data(data=answer)))
                self.transport.write(conn.send(h11.EndOfMessage()))
                if not keep or conn.our_state is not h11.DONE:
                    return
                await self.drain()  # a client that does not read gets no more answers
                conn.start_next_cycle()
                self.transport.resume_reading()

        async def _answer(self, request: h11.Request) -> tuple[int, bytes]:
            """Read the request's body (bounded in size and time), then answer it.  No
            more is read from the client until this answer is written."""
            if request.method != b"POST":
                return 405, b"POST only\n"
            headers = dict(request.headers)
            length = headers.get(b"content-length")
            if length is not None and int(length) > poll.MAX_BODY:  # h11 checked the digits
                return 413, b"too big\n"
            body = bytearray()
            deadline = self.loop.time() + REQUEST_BODY_TIMEOUT
            while True:
                part = await self._next_event(deadline - self.loop.time())
                if isinstance(part, h11.Data):
                    body += part.data
                    if len(body) > poll.MAX_BODY:
                        return 413, b"too big\n"
                elif isinstance(part, h11.EndOfMessage):
                    break
                else:
                    raise h11.RemoteProtocolError("the request ended before its body")
            self.transport.pause_reading()
            target = request.target.decode("ascii", "replace").partition("?")[0]
            sid = headers.get(poll.SESSION_HEADER.encode(), b"").decode("ascii", "replace")
            peer = self.transport.get_extra_info("peername")
            if target in sessions.paths:  # a new session: the relay reads its headers
                pairs = ((k.decode("latin-1"), v.decode("latin-1")) for k, v in request.headers)
                return await sessions.answer(target, bytes(body), peer, sid, Headers(pairs))
            return await sessions.answer(target, bytes(body), peer, sid)

    return FrontConnection
