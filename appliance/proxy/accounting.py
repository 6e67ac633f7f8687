"""The relay's side of per-user accounting (appliance/state/usage.py holds the tables).

A finished connection adds to an in-memory aggregate keyed by (day, user, service,
session): a dict lookup and four additions, on the connection-rate path.  Every
FLUSH_EVERY seconds, and at stop, the aggregate is swapped for an empty one and
written in one transaction on a thread of its own (off the event loop: a busy store
must not stall the relay).  Each worker process has its own recorder; the UPSERTs
add, so the workers' batches sum in the store.  After each flush the day's totals
are read back: a rule's `quota_bytes_per_day` is checked against them plus this
worker's counts since (`used_today`), so a quota may be overrun by what the other
workers counted in their last FLUSH_EVERY seconds, and by connections already open.
A batch that cannot be written is kept and tried again with the next one (counted
in `failed`), so a locked store loses nothing; what a crash loses is at most the
last FLUSH_EVERY seconds.

Refused connections are not accounted (no bytes reach a server); a connection
without a user (not logged in) neither.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from appliance.core.config import StateConfig
from appliance.state import schema, usage
from appliance.state.connection import STORE_ERRORS, Connection

log = logging.getLogger("appliance.proxy.accounting")

FLUSH_EVERY = 5.0
Key = tuple[str, str, str, str | None]  # (day, user, service, session)


class UsageRecorder:
    """Per-worker aggregate of finished connections, flushed to the store in batches."""

    def __init__(self, connect: Callable[[], Connection]) -> None:
        self._connect = connect
        self._conn: Connection | None = None
        # key -> [connections, bytes up, bytes down, messages]
        self.pending: dict[Key, list[int]] = {}
        self._day = (-1, "")  # (UTC day number, its name): one strftime a day
        self._lock = threading.Lock()  # one writer at a time (flush thread, stop)
        self._task: asyncio.Task[None] | None = None
        # today's bytes per (user, service) in the store, read after each flush (quotas)
        self.stored_today: tuple[str, dict[tuple[str, str], int]] = ("", {})
        self.written = 0  # batch lines written
        self.failed = 0  # flushes that failed (their lines were kept)

    @classmethod
    def at(cls, where: Path | StateConfig) -> UsageRecorder:
        """A recorder over the store `[state]` configures, or the SQLite file at a path
        (the proxy run on its own); its connection is opened on first flush."""
        from appliance.state import store

        def connect() -> Connection:
            if isinstance(where, StateConfig):
                return store.open_store(where)
            conn = store.connect(where)
            schema.upgrade(conn)
            return conn

        return cls(connect)

    def record(
        self,
        user: str,
        service: str,
        session: str | None,
        up: int,
        down: int,
        messages: int = 0,
        when: float | None = None,
    ) -> None:
        """One finished connection (the hot path: no I/O)."""
        now = time.time() if when is None else when
        number = int(now // 86400)
        if number != self._day[0]:
            self._day = (number, usage.day_of(now))
        key = (self._day[1], user, service, session)
        counts = self.pending.get(key)
        if counts is None:
            self.pending[key] = [1, up, down, messages]
        else:
            counts[0] += 1
            counts[1] += up
            counts[2] += down
            counts[3] += messages

    def take(self) -> list[usage.Entry]:
        """The aggregate so far as a batch; the recorder starts a new one."""
        pending, self.pending = self.pending, {}
        return [usage.Entry(d, u, s, sess, *c) for (d, u, s, sess), c in pending.items()]

    def write(self, batch: list[usage.Entry]) -> bool:
        """Write a batch (blocking: call it off the event loop); False: kept for later."""
        if not batch:
            return True
        with self._lock:
            try:
                if self._conn is None:
                    self._conn = self._connect()
                self.written += usage.add(self._conn, batch)
                self._read_today(self._conn)
                return True
            except STORE_ERRORS as exc:
                self.failed += 1
                log.warning("usage: %d line(s) not written yet: %s", len(batch), exc)
        return False

    def _read_today(self, conn: Connection) -> None:
        day = usage.day_of()
        self.stored_today = (day, usage.bytes_of_day(conn, day))

    def refresh(self) -> None:
        """Read today's totals from the store (blocking; the flushes do it after writing)."""
        with self._lock:
            try:
                if self._conn is None:
                    self._conn = self._connect()
                self._read_today(self._conn)
            except STORE_ERRORS as exc:
                log.warning("usage: today's totals not read: %s", exc)

    def used_today(self, user: str, service: str, when: float | None = None) -> int:
        """Bytes both ways of a user and service today: the store's as of the last flush
        (every worker's) plus what this worker counted since.  Only asked for users
        whose rule sets a quota: a walk over the few keys pending since the flush."""
        day = usage.day_of(when)
        stored_day, stored = self.stored_today
        total = stored.get((user, service), 0) if stored_day == day else 0
        for (d, u, s, _session), counts in self.pending.items():
            if u == user and s == service and d == day:
                total += counts[1] + counts[2]
        return total

    def put_back(self, batch: list[usage.Entry]) -> None:
        """A batch not written goes back into the aggregate (on the loop's thread)."""
        for e in batch:
            key = (e.day, e.user, e.service, e.session)
            counts = self.pending.setdefault(key, [0, 0, 0, 0])
            counts[0] += e.connections
            counts[1] += e.bytes_up
            counts[2] += e.bytes_down
            counts[3] += e.messages

    async def flush(self) -> None:
        """Write what is pending on a thread (the loop goes on meanwhile)."""
        batch = self.take()
        if not batch:  # nothing of ours: still the other workers' counts, for quotas
            await asyncio.to_thread(self.refresh)
        elif not await asyncio.to_thread(self.write, batch):
            self.put_back(batch)

    async def _run(self, every: float) -> None:
        await asyncio.to_thread(self.refresh)  # today's totals so far, for quotas
        while True:
            await asyncio.sleep(every)
            try:
                await self.flush()
            except Exception:  # never let accounting end the relay
                log.exception("usage flush failed")

    def start(self, loop: asyncio.AbstractEventLoop, every: float = FLUSH_EVERY) -> None:
        self._task = loop.create_task(self._run(every))

    async def stop(self) -> None:
        """The last flush (at shutdown), then the connection closes."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        await self.flush()
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


__all__ = ["FLUSH_EVERY", "UsageRecorder"]
