"""Relaying over raw sockets on an edge-triggered epoll: copy small, splice(2) bulk.

A direction starts by copying: one read into the process's one buffer, one
write out of it; that is what most connections ever need (a request and its
answer, mail commands).  A read that fills the buffer makes the direction bulk:
from then on bytes go socket -> pipe -> socket inside the kernel and Python
only sees how many moved.  A pipe is taken from the pool when a bulk direction
has bytes to move and given back as soon as it is empty again, so idle
connections hold no pipe: the file descriptors stay at two per connection
(plus a pool of a few pipes for the busy ones), well under the process limit
of 20,000.  Flow control is the kernel's: when the destination socket is full
the bytes stay in the pipe (or, copied, in the direction's stash, one buffer
at most) and the source is not read until the destination is writable again.

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
import functools
import logging
import os
import select
import socket
from collections.abc import Callable

log = logging.getLogger("appliance.proxy")

F_SETPIPE_SZ = 1031
PIPE_SIZE = 1 << 20
CHUNK = 1 << 20
FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
ROUNDS = 8  # reads and writes per turn before yielding to other connections
# the copy path's one buffer (a direction's bytes leave it before the next read)
COPY_SIZE = 64 * 1024
COPY_VIEW = memoryview(bytearray(COPY_SIZE))
COPY_BUFFERS = [COPY_VIEW]
# an edge after which a short read is no sign of an empty queue: the peer hung up (the
# EOF is still to read), or urgent data is pending (a read stops at the urgent mark)
READ_ON = select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR | select.EPOLLPRI

EDGE = select.EPOLLIN | select.EPOLLPRI | select.EPOLLOUT | select.EPOLLRDHUP | select.EPOLLET
# what makes a socket worth reading (EOF and errors surface from the read itself)
READ = select.EPOLLIN | select.EPOLLPRI | select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR
WRITE = select.EPOLLOUT | select.EPOLLHUP | select.EPOLLERR

Handler = Callable[[int], None]
Seen = Callable[[memoryview], None]
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

    def claim(self, fd: int, handler: Handler) -> None:
        """Watch fd with this handler, whether it was watched before (by another owner)
        or not."""
        if fd in self.handlers:
            self.handlers[fd] = handler
        else:
            self.watch(fd, handler)

    def rehandle(self, fd: int, handler: Handler) -> None:
        """Same registration, new handler (a connected upstream joins its relay)."""
        self.handlers[fd] = handler

    def forget(self, fd: int) -> None:
        """Out of the epoll, socket kept open (it is watched again under a new owner; an
        edge-triggered registration reports what is pending at once)."""
        self.handlers.pop(fd, None)
        self.ep.unregister(fd)

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

    def _end_batch(self) -> None:
        """Close what was closed during the batch (see the class docstring)."""
        self.busy = False
        closing, self.closing = self.closing, []
        for sock in closing:
            sock.close()

    # (the two batch loops use try/finally, not a shared context manager: a generator
    # context manager costs a microsecond a batch, on the connection-rate path)
    def _dispatch(self) -> None:
        self.busy = True
        try:
            handlers = self.handlers
            for fd, ev in self.ep.poll(0, 1024):
                handler = handlers.get(fd)
                if handler is not None:
                    try:
                        handler(ev)
                    except Exception:  # one connection's bug must not lose the batch's edges
                        log.exception("splice handler for fd %d", fd)
        finally:
            self._end_batch()

    def _run_later(self) -> None:
        todo, self.later = self.later, []
        self.busy = True
        try:
            for fn in todo:
                try:
                    fn()
                except Exception:
                    log.exception("splice turn")
        finally:
            self._end_batch()

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
    """One direction of a relayed connection: src socket -> dst socket.

    It starts by copying: a read into the process's one buffer, a write out of
    it (what the destination does not take waits in `stash`).  For the small
    exchanges most connections are (a request, a reply, mail commands) that is
    two plain syscalls where splice(2) costs two dearer ones.  A read that fills
    the buffer marks the direction as bulk, and from then on its bytes go
    socket -> pipe -> socket inside the kernel (`pending` bytes in the pipe).

    `readable` and `writable` are what the last edges said and the last call
    did not contradict (EAGAIN clears them, the next edge sets them again).  A
    copy read that comes back short has emptied the socket's receive queue, so
    the direction waits for the next edge instead of asking again; unless that
    edge also said the peer hung up (the next read is the EOF) or that urgent
    data is pending (`read_on`): a read stops short at the urgent mark, so then
    it reads on until EAGAIN, and with copies, since splice cannot pass the
    mark at all (`urgent`; the urgent byte itself is not relayed, as no
    userspace relay can).
    A direction holds no reference back to its connection (which is passed in):
    no cycle, so a closed connection is freed by its reference count, not by
    the cyclic garbage collector's passes.
    """

    __slots__ = (
        "bulk",
        "dst",
        "eof",
        "finished",
        "moved",
        "pending",
        "pipe",
        "read_on",
        "readable",
        "seen",
        "src",
        "stash",
        "urgent",
        "writable",
    )

    def __init__(self, src: int, dst: int) -> None:
        self.src = src
        self.dst = dst
        self.pipe: tuple[int, int] | None = None
        self.pending = 0  # bytes in the pipe
        self.stash = b""  # copied bytes the destination has not taken yet
        self.bulk = False
        self.eof = False  # src said EOF
        self.read_on = False  # the last edge on src said: read until EAGAIN (READ_ON)
        self.urgent = False  # and that urgent data is pending: splice cannot pass its mark
        self.finished = False  # and everything before it reached dst: dst was shut
        self.moved = 0
        self.readable = False
        self.writable = True
        # an observer of the bytes (SMTP's message count): while set, the direction is
        # copied, never spliced, and each read is shown to it before it is written
        self.seen: Seen | None = None

    def pump(self, conn: SpliceConn) -> None:
        if conn.closed or self.finished:
            return
        try:
            for _ in range(ROUNDS):
                if self.stash or self.pending:
                    if not self.writable:
                        return
                    try:
                        if self.stash:
                            m = os.write(self.dst, self.stash)
                            self.stash = self.stash[m:]
                        else:
                            assert self.pipe is not None
                            m = os.splice(self.pipe[0], self.dst, self.pending, flags=FLAGS)
                            self.pending -= m
                    except BlockingIOError:
                        self.writable = False
                        return
                    self.moved += m
                    continue
                if self.eof:
                    if self.pipe is not None:
                        self._give_back(conn.pool)
                    self.finished = True
                    conn.half_closed(self)
                    return
                if not self.readable:
                    if self.pipe is not None:
                        self._give_back(conn.pool)
                    return
                splicing = self.bulk and not self.urgent
                try:
                    if splicing:
                        if self.pipe is None:
                            self.pipe = conn.pool.get()
                        n = os.splice(self.src, self.pipe[1], CHUNK, flags=FLAGS)
                    else:
                        n = os.readv(self.src, COPY_BUFFERS)
                except BlockingIOError:
                    self.readable = False
                    continue
                if n == 0:
                    self.eof = True
                    self.readable = False
                    continue
                if splicing:
                    self.pending += n
                    continue
                if self.seen is not None:
                    self.seen(COPY_VIEW[:n])
                if n == COPY_SIZE:
                    if self.seen is None:
                        self.bulk = True  # a full buffer: more is coming, splice it
                elif not self.read_on:
                    self.readable = False  # the receive queue is empty: wait for an edge
                try:  # (writable: a read only happens with nothing left to write)
                    m = os.write(self.dst, COPY_VIEW[:n])
                except BlockingIOError:
                    self.writable = False
                    m = 0
                self.moved += m
                if m < n:
                    self.stash = COPY_VIEW[m:n].tobytes()
        except OSError:
            conn.close("reset")
            return
        # rounds used up: others first, then on from here
        conn.poll.soon(functools.partial(self.pump, conn))

    def _give_back(self, pool: PipePool) -> None:
        assert self.pipe is not None
        pool.put(self.pipe)
        self.pipe = None

    def release(self, pool: PipePool) -> None:
        self.stash = b""
        if self.pipe is not None:
            # bytes still in the pipe are lost with the connection: do not reuse it
            pool.discard(self.pipe) if self.pending else pool.put(self.pipe)
            self.pipe = None


def _closed(_conn: SpliceConn, _result: str) -> None:
    """The close callback of a connection already closed."""


class SpliceConn:
    """Both directions of one relayed connection over raw non-blocking sockets.

    The upstream is already registered in `poll` (its connect was watched
    there); `events` is the mask its connect completed with.  `first_up` and
    `first_down` are bytes read before the relay began (a ClientHello, what a
    web proxy sent after its tunnel answer): they leave first, as a stash.
    `seen` (up, down): observers of each direction's bytes (see Direction), set
    before the first byte moves.
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
        first_up: bytes = b"",
        first_down: bytes = b"",
        seen: tuple[Seen, Seen] | None = None,
    ) -> None:
        self.poll = poll
        self.pool = pool
        self.client = client
        self.upstream = upstream
        self.on_close = on_close
        cfd, ufd = client.fileno(), upstream.fileno()
        self.up = Direction(cfd, ufd)
        self.down = Direction(ufd, cfd)
        self.up.stash = first_up
        self.down.stash = first_down
        if seen is not None:
            self.up.seen, self.down.seen = seen
        self.done = 0
        self.closed = False
        poll.claim(cfd, self.client_event)
        poll.rehandle(ufd, self.upstream_event)
        # the client has usually sent its request while the upstream connected: move it
        # now rather than after one more trip through the event loop (time to first byte)
        self.up.readable = True
        self.up.pump(self)
        if first_down:
            self.down.pump(self)
        if events & READ:
            self.upstream_event(events)

    def client_event(self, ev: int) -> None:
        self._edge(ev, self.up, self.down)

    def upstream_event(self, ev: int) -> None:
        self._edge(ev, self.down, self.up)

    def _edge(self, ev: int, reading: Direction, writing: Direction) -> None:
        """An edge on a socket: `reading` is the direction it is the source of, `writing`
        the one it is the destination of.  The reported mask is the socket's whole state,
        not just what changed (a new segment reports IN|OUT): a direction is pumped for a
        writable edge only when it was waiting for one."""
        if ev & READ:
            reading.readable = True
            reading.read_on = bool(ev & READ_ON)
            reading.urgent = bool(ev & select.EPOLLPRI)
            reading.pump(self)
        if ev & WRITE and not writing.writable:
            writing.writable = True
            writing.pump(self)

    def half_closed(self, d: Direction) -> None:
        self.done += 1
        if self.done >= 2:  # the close sends the last FIN: no shutdown syscall needed
            self.close("ok")
            return
        try:  # noqa: SIM105 (contextlib.suppress costs three calls per connection)
            (self.upstream if d is self.up else self.client).shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the peer is gone already: its own event closes the connection

    def close(self, result: str) -> None:
        if self.closed:
            return
        self.closed = True
        self.up.release(self.pool)
        self.down.release(self.pool)
        self.poll.close(self.client)
        self.poll.close(self.upstream)
        on_close, self.on_close = self.on_close, _closed  # the owner refers to us: no cycle
        on_close(self, result)
