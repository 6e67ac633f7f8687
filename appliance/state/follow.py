"""One way to follow the store's changes: a cursor over an event table, by id.

The lease events (written by the DHCP server with each lease change) and the session
events (written with each session's start and end) are append-only tables whose ids
grow in commit order: SQLite has one writer at a time, and each event row is written
in the transaction of the change it records.  A follower keeps the last id it has
handled and asks for the events after it, so it never misses a change and never sees
one twice, whatever the clocks of the writers say.  The net role (lease and session
events into the kernel's sets), the portal (lease events end sessions), the proxy and
the DNS role (ended sessions close connections and leave caches) all follow this way.

A backend whose ids are not in commit order (PostgreSQL sequences are not) must
serialise the event writers, or hold readers back to ids below the oldest open
writer, to keep this promise.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Generic, Protocol, TypeVar


class Event(Protocol):
    @property
    def id(self) -> int: ...


E = TypeVar("E", bound=Event)

BATCH = 1000


class Cursor(Generic[E]):
    """Hands out each event of one table once, in id order, from after `after`."""

    def __init__(self, read: Callable[[int, int], Sequence[E]], after: int) -> None:
        self.read = read  # (last id, limit) -> the events after it, oldest first
        self.last = after

    def poll(self, limit: int = BATCH) -> list[E]:
        """The next events (at most `limit`; a full batch means: ask again at once)."""
        events = list(self.read(self.last, limit))
        if events:
            self.last = events[-1].id
        return events

    def drain(self, limit: int = BATCH) -> list[E]:
        """Every event there is now, however many batches that takes.  The cursor moves
        only when all were read: a read that fails on a later batch loses none."""
        out: list[E] = []
        last = self.last
        while batch := list(self.read(last, limit)):
            out += batch
            last = batch[-1].id
            if len(batch) < limit:
                break
        self.last = last
        return out


__all__ = ["BATCH", "Cursor", "Event"]
