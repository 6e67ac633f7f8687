"""Kept-alive upstream connections, pooled per upstream (the site's web proxy, an origin).

A page of many objects, or many guests' short connections, would otherwise pay a
TCP connect to the upstream for every request.  A connection whose response
ended cleanly, with both sides willing to keep it, is put here; the next request
for the same upstream takes the newest one.  An idle connection that becomes
readable (the server closed it, or sent something it should not have) is closed
at once; one idle longer than `idle` seconds is closed by the sweep; at most
`keep` are kept per upstream and `keep_total` in all (direct mode has as many
upstreams as there are origins: a guest must not hold the relay's descriptors).
A connection taken may still have been closed by the server a moment ago: the
caller retries an idempotent request once on a new connection when a reused one
closes before its answer (RFC 9112 9.3.1).
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable

from appliance.proxy.splice import READ, EdgePoll, Sock

Key = tuple[str, int]


class UpstreamPool:
    def __init__(
        self,
        edges: EdgePoll,
        loop: asyncio.AbstractEventLoop,
        keep: int = 32,
        idle: float = 30.0,
        keep_total: int = 256,
    ) -> None:
        self.edges = edges
        self.loop = loop
        self.keep = keep
        self.keep_total = keep_total
        self.idle = idle
        self.idle_conns: dict[Key, list[tuple[Sock, float]]] = {}
        self._sweep_timer: asyncio.TimerHandle | None = None
        self.reused = 0  # connections taken from the pool (the benchmark reads it)

    def take(self, key: Key, check: bool = True) -> Sock | None:
        """The newest idle connection to `key` that still looks open, or None.  `check`
        False skips the look (a syscall) for a request that can be sent again on a new
        connection if this one turns out closed (the idle handler saw to most of those)."""
        conns = self.idle_conns.get(key)
        while conns:
            sock, _since = conns.pop()
            if not check:
                self.reused += 1
                return sock
            try:  # EOF, or bytes no request asked for: either way not reusable
                sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
                alive = False
            except BlockingIOError:
                alive = True  # nothing to read: open and quiet, as an idle one should be
            except OSError:
                alive = False
            if alive:
                self.reused += 1
                return sock
            self.edges.close(sock)
        return None

    def put(self, key: Key, sock: Sock) -> None:
        conns = self.idle_conns.setdefault(key, [])
        if len(conns) >= self.keep:
            oldest, _ = conns.pop(0)
            self.edges.close(oldest)
        elif self._total(conns) >= self.keep_total:
            self._evict_oldest()  # many upstreams (direct mode): a bound for all of them
        conns.append((sock, time.monotonic()))
        self.edges.rehandle(sock.fileno(), self._idle_handler(key, sock))
        if self._sweep_timer is None:
            self._sweep_timer = self.loop.call_later(self.idle / 2, self._sweep)

    def size(self) -> int:
        return sum(len(c) for c in self.idle_conns.values())

    def _total(self, conns: list[tuple[Sock, float]]) -> int:
        """size(), without the sum when `conns` (a list of the pool's) is the only one: the
        common case of one web proxy, asked on every put."""
        return len(conns) if len(self.idle_conns) == 1 else self.size()

    def _evict_oldest(self) -> None:
        key = min(
            (k for k, c in self.idle_conns.items() if c), key=lambda k: self.idle_conns[k][0][1]
        )
        self.edges.close(self.idle_conns[key].pop(0)[0])

    def _idle_handler(self, key: Key, sock: Sock) -> Callable[[int], None]:
        def idle_event(ev: int) -> None:
            if ev & READ:  # an idle upstream has nothing to say: it closed, or misbehaves
                self._drop(key, sock)

        return idle_event

    def _drop(self, key: Key, sock: Sock) -> None:
        conns = self.idle_conns.get(key, [])
        for i, (s, _since) in enumerate(conns):
            if s is sock:
                del conns[i]
                break
        self.edges.close(sock)

    def _sweep(self) -> None:
        self._sweep_timer = None
        old = time.monotonic() - self.idle
        for key in list(self.idle_conns):
            conns = self.idle_conns[key]
            while conns and conns[0][1] < old:
                self.edges.close(conns.pop(0)[0])
            if not conns:
                del self.idle_conns[key]
        if self.idle_conns:
            self._sweep_timer = self.loop.call_later(self.idle / 2, self._sweep)

    def close(self) -> None:
        if self._sweep_timer is not None:
            self._sweep_timer.cancel()
            self._sweep_timer = None
        for conns in self.idle_conns.values():
            for sock, _ in conns:
                self.edges.close(sock)
        self.idle_conns.clear()
