"""Zero-copy relaying with splice(2) for plain TCP services, on an edge-triggered epoll.

Bytes go socket -> pipe -> socket inside the kernel; Python only sees how many
moved.  A pipe is taken from the pool when a direction has bytes to move and
given back as soon as it is empty again, so idle connections hold no pipe: the
file descriptors stay at two per connection (plus a pool of a few pipes for the
busy ones), well under the process limit of 20,000.  Flow control is the
kernel's: when the destination socket is full the bytes stay in the pipe and
the source is not read until the destination says it is writable again.

Every socket is registered once, edge-triggered, in one epoll of our own
(`EdgePoll`) that sits in the asyncio loop as a single reader.  The loop's own
readers are level-triggered and are added and removed as a direction stalls
and resumes: per relayed connection that was about eight epoll_ctl calls and
as many handle objects (the profile of the connection-rate benchmark); here it
is one registration per socket, and closing the socket removes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import select
import socket
from collections.abc import Callable, Iterator

log = logging.getLogger("appliance.proxy")

F_SETPIPE_SZ = 1031
PIPE_SIZE = 1 << 20
CHUNK = 1 << 20
FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
ROUNDS = 8  # splices per turn before yielding to other connections

EDGE = select.EPOLLIN | select.EPOLLOUT | select.EPOLLRDHUP | select.EPOLLET
# what makes a socket worth reading (EOF and errors surface from the read itself)
READ = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR
WRITE = select.EPOLLOUT | select.EPOLLHUP | select.EPOLLERR

Handler = Callable[[int], None]
# the C socket type (socket.socket is its Python subclass): no io refcounting to pay for
Sock = socket.SocketType


class EdgePoll:
    """An epoll of our own inside the event loop: handlers get the event mask.

    Sockets closed while a batch of events is being handled are closed after
    it: a number freed and reused inside the batch would otherwise get the old
    socket's stale events.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.ep = select.epoll()
        self.handlers: dict[int, Handler] = {}
        self.closing: list[Sock] = []
        self.later: list[Callable[[], None]] = []
        self.busy = False
        loop.add_reader(self.ep.fileno(), self._dispatch)

    def watch(self, fd: int, handler: Handler, mask: int = EDGE) -> None:
        self.ep.register(fd, mask)
        self.handlers[fd] = handler

    def rehandle(self, fd: int, handler: Handler) -> None:
        """Same registration, new handler (a connected upstream joins its relay)."""
        self.handlers[fd] = handler

    def modify(self, fd: int, mask: int) -> None:
        self.ep.modify(fd, mask)

    def close(self, sock: Sock) -> None:
        """Forget the socket and close it (which removes it from the epoll)."""
        self.handlers.pop(sock.fileno(), None)
        if self.busy:
            self.closing.append(sock)
        else:
            sock.close()

    def soon(self, fn: Callable[[], None]) -> None:
        """Run fn after the events at hand (a direction that used up its rounds)."""
        if not self.later:
            self.loop.call_soon(self._run_later)
        self.later.append(fn)

    @contextlib.contextmanager
    def _batch(self) -> Iterator[None]:
        """Sockets closed inside are closed at its end (see the class docstring)."""
        self.busy = True
        try:
            yield
        finally:
            self.busy = False
            closing, self.closing = self.closing, []
            for sock in closing:
                sock.close()

    def _dispatch(self) -> None:
        with self._batch():
            for fd, ev in self.ep.poll(0, 1024):
                handler = self.handlers.get(fd)
                if handler is not None:
                    try:
                        handler(ev)
                    except Exception:  # one connection's bug must not lose the batch's edges
                        log.exception("splice handler for fd %d", fd)

    def _run_later(self) -> None:
        todo, self.later = self.later, []
        with self._batch():
            for fn in todo:
                try:
                    fn()
                except Exception:
                    log.exception("splice turn")

    def shutdown(self) -> None:
        self.loop.remove_reader(self.ep.fileno())
        self.ep.close()


class PipePool:
    """Idle pipes for reuse; at most `keep` are kept open when nobody needs them."""

    def __init__(self, keep: int = 32) -> None:
        self.keep = keep
        self.free: list[tuple[int, int]] = []
        self.open = 0

    def get(self) -> tuple[int, int]:
        if self.free:
            return self.free.pop()
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        with contextlib.suppress(OSError):
            fcntl.fcntl(w, F_SETPIPE_SZ, PIPE_SIZE)
        self.open += 1
        return r, w

    def put(self, pipe: tuple[int, int]) -> None:
        if len(self.free) < self.keep:
            self.free.append(pipe)
        else:
            self.discard(pipe)

    def discard(self, pipe: tuple[int, int]) -> None:
        os.close(pipe[0])
        os.close(pipe[1])
        self.open -= 1


class Direction:
    """One direction of a spliced connection: src socket -> pipe -> dst socket.

    `readable` and `writable` are what the last edges said and the last splice
    did not contradict (EAGAIN clears them, the next edge sets them again).
    """

    __slots__ = (
        "conn",
        "dst",
        "eof",
        "finished",
        "moved",
        "pending",
        "pipe",
        "readable",
        "src",
        "writable",
    )

    def __init__(self, conn: SpliceConn, src: int, dst: int) -> None:
        self.conn = conn
        self.src = src
        self.dst = dst
        self.pipe: tuple[int, int] | None = None
        self.pending = 0
        self.eof = False  # src said EOF
        self.finished = False  # and everything before it reached dst: dst was shut
        self.moved = 0
        self.readable = False
        self.writable = True

    def pump(self) -> None:
        conn = self.conn
        if conn.closed or self.finished:
            return
        try:
            for _ in range(ROUNDS):
                if self.pending:
                    if not self.writable:
                        return
                    assert self.pipe is not None
                    try:
                        m = os.splice(self.pipe[0], self.dst, self.pending, flags=FLAGS)
                    except BlockingIOError:
                        self.writable = False
                        return
                    self.pending -= m
                    self.moved += m
                    continue
                if self.eof:
                    self._give_back()
                    self.finished = True
                    conn.half_closed(self)
                    return
                if not self.readable:
                    self._give_back()
                    return
                if self.pipe is None:
                    self.pipe = conn.pool.get()
                try:
                    n = os.splice(self.src, self.pipe[1], CHUNK, flags=FLAGS)
                except BlockingIOError:
                    self.readable = False
                    continue
                if n == 0:
                    self.eof = True
                    self.readable = False
                    continue
                self.pending += n
        except OSError:
            conn.close("reset")
            return
        conn.poll.soon(self.pump)  # rounds used up: others first, then on from here

    def _give_back(self) -> None:
        if self.pipe is not None:
            self.conn.pool.put(self.pipe)
            self.pipe = None

    def release(self) -> None:
        if self.pipe is not None:
            # bytes still in the pipe are lost with the connection: do not reuse it
            self.conn.pool.discard(self.pipe) if self.pending else self.conn.pool.put(self.pipe)
            self.pipe = None


class SpliceConn:
    """Both directions of one relayed connection over raw non-blocking sockets.

    The upstream is already registered in `poll` (its connect was watched
    there); `events` is the mask its connect completed with.
    """

    __slots__ = ("client", "closed", "done", "down", "on_close", "poll", "pool", "up", "upstream")

    def __init__(
        self,
        poll: EdgePoll,
        pool: PipePool,
        client: Sock,
        upstream: Sock,
        on_close: Callable[[SpliceConn, str], None],
        events: int = 0,
    ) -> None:
        self.poll = poll
        self.pool = pool
        self.client = client
        self.upstream = upstream
        self.on_close = on_close
        cfd, ufd = client.fileno(), upstream.fileno()
        self.up = Direction(self, cfd, ufd)
        self.down = Direction(self, ufd, cfd)
        self.done = 0
        self.closed = False
        poll.watch(cfd, self.client_event)
        poll.rehandle(ufd, self.upstream_event)
        # the client has usually sent its request while the upstream connected: move it
        # now rather than after one more trip through the event loop (time to first byte)
        self.up.readable = True
        self.up.pump()
        if events & READ:
            self.upstream_event(events)

    # The reported mask is the socket's whole state, not just what changed: a new
    # segment reports IN|OUT.  A direction is pumped for a writable edge only when it
    # was waiting for one.
    def client_event(self, ev: int) -> None:
        if ev & READ:
            self.up.readable = True
            self.up.pump()
        if ev & WRITE and not self.down.writable:
            self.down.writable = True
            self.down.pump()

    def upstream_event(self, ev: int) -> None:
        if ev & READ:
            self.down.readable = True
            self.down.pump()
        if ev & WRITE and not self.up.writable:
            self.up.writable = True
            self.up.pump()

    def half_closed(self, d: Direction) -> None:
        self.done += 1
        if self.done >= 2:  # the close sends the last FIN: no shutdown syscall needed
            self.close("ok")
            return
        with contextlib.suppress(OSError):
            (self.upstream if d is self.up else self.client).shutdown(socket.SHUT_WR)

    def close(self, result: str) -> None:
        if self.closed:
            return
        self.closed = True
        self.up.release()
        self.down.release()
        self.poll.close(self.client)
        self.poll.close(self.upstream)
        self.on_close(self, result)
