"""Zero-copy relaying with splice(2) for plain TCP services, pipes from a shared pool.

Bytes go socket -> pipe -> socket inside the kernel; Python only sees how many
moved.  A pipe is taken from the pool when a direction has bytes to move and
given back as soon as it is empty again, so idle connections hold no pipe: the
file descriptors stay at two per connection (plus a pool of a few pipes for the
busy ones), well under the process limit of 20,000.  Flow control is the
kernel's: when the destination socket is full the bytes stay in the pipe, the
source is no longer read (its reader is removed) until the destination drains.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import socket
from collections.abc import Callable

F_SETPIPE_SZ = 1031
PIPE_SIZE = 1 << 20
CHUNK = 1 << 20
FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
ROUNDS = 8  # splices per callback before yielding to other connections


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
    """One direction of a spliced connection: src socket -> pipe -> dst socket."""

    __slots__ = ("conn", "dst", "eof", "moved", "pending", "pipe", "src")

    def __init__(self, conn: SpliceConn, src: int, dst: int) -> None:
        self.conn = conn
        self.src = src
        self.dst = dst
        self.pipe: tuple[int, int] | None = None
        self.pending = 0
        self.eof = False
        self.moved = 0

    def readable(self) -> None:
        conn = self.conn
        pool = conn.pool
        try:
            for _ in range(ROUNDS):
                if self.pipe is None:
                    self.pipe = pool.get()
                try:
                    n = os.splice(self.src, self.pipe[1], CHUNK, flags=FLAGS)
                except BlockingIOError:
                    break
                if n == 0:
                    self.eof = True
                    conn.loop.remove_reader(self.src)
                    break
                self.pending += n
                if not self.drain():
                    return
            if self.pending == 0 and self.pipe is not None:
                pool.put(self.pipe)
                self.pipe = None
            if self.eof and self.pending == 0:
                conn.half_closed(self)
        except OSError:
            conn.close("reset")

    def drain(self) -> bool:
        """Move what the pipe holds to dst; False (and wait for writable) if dst is full."""
        assert self.pipe is not None
        while self.pending:
            try:
                m = os.splice(self.pipe[0], self.dst, self.pending, flags=FLAGS)
            except BlockingIOError:
                loop = self.conn.loop
                loop.remove_reader(self.src)
                loop.add_writer(self.dst, self.writable)
                return False
            self.pending -= m
            self.moved += m
        return True

    def writable(self) -> None:
        try:
            if not self.drain():
                return
        except OSError:
            self.conn.close("reset")
            return
        loop = self.conn.loop
        loop.remove_writer(self.dst)
        if self.pipe is not None:
            self.conn.pool.put(self.pipe)
            self.pipe = None
        if self.eof:
            self.conn.half_closed(self)
        else:
            loop.add_reader(self.src, self.readable)

    def release(self) -> None:
        if self.pipe is not None:
            # bytes still in the pipe are lost with the connection: do not reuse it
            self.conn.pool.discard(self.pipe) if self.pending else self.conn.pool.put(self.pipe)
            self.pipe = None


class SpliceConn:
    """Both directions of one relayed connection over raw sockets."""

    __slots__ = ("closed", "done", "down", "loop", "on_close", "pool", "sock_a", "sock_b", "up")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        pool: PipePool,
        client: socket.socket,
        upstream: socket.socket,
        on_close: Callable[[SpliceConn, str], None],
    ) -> None:
        self.loop = loop
        self.pool = pool
        self.sock_a = client
        self.sock_b = upstream
        self.on_close = on_close
        self.up = Direction(self, client.fileno(), upstream.fileno())
        self.down = Direction(self, upstream.fileno(), client.fileno())
        self.done = 0
        self.closed = False
        loop.add_reader(self.up.src, self.up.readable)
        loop.add_reader(self.down.src, self.down.readable)
        # the client has usually sent its request while the upstream connected: move it
        # now rather than after one more trip through the event loop (time to first byte)
        self.up.readable()

    def half_closed(self, d: Direction) -> None:
        self.done += 1
        if self.done >= 2:  # the close sends the last FIN: no shutdown syscall needed
            self.close("ok")
            return
        with contextlib.suppress(OSError):
            (self.sock_b if d is self.up else self.sock_a).shutdown(socket.SHUT_WR)

    def close(self, result: str) -> None:
        if self.closed:
            return
        self.closed = True
        for fd in (self.up.src, self.down.src):
            self.loop.remove_reader(fd)
            self.loop.remove_writer(fd)
        self.up.release()
        self.down.release()
        self.sock_a.close()
        self.sock_b.close()
        self.on_close(self, result)
