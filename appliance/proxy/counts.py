"""Open connections per (user, service): what a rule's `max_connections` is checked against.

With one proxy process a Counter does.  With several worker processes (see
workers.py) the kernel spreads one guest's connections over all of them, so
the counts live in one shared anonymous mapping made before the fork: an
open-addressing table of (key, count) pairs of 64-bit integers, linear
probing, a slot freed as soon as its count is back to zero (backward-shift
deletion, so no tombstones pile up), one process-shared lock around each
change.  The key is Python's hash of (user, service): the forked workers share
the parent's hash secret, and 63 bits make a collision between two of the few
thousand users of one appliance vanishingly unlikely (a collision would only
make two users share one limit).
"""

from __future__ import annotations

import mmap
import multiprocessing
from collections import Counter
from typing import Protocol

MASK63 = (1 << 63) - 1


class Counts(Protocol):
    def take(self, user: str, service: str, limit: int | None) -> bool:
        """Count one more connection; False (and nothing counted) when at `limit`."""
        ...

    def give(self, user: str, service: str) -> None:
        """One connection of this user to this service has ended."""
        ...

    def get(self, user: str, service: str) -> int: ...

    def __len__(self) -> int:
        """How many (user, service) pairs have open connections."""
        ...


class LocalCounts:
    """The counts of a single proxy process."""

    def __init__(self) -> None:
        self.open: Counter[tuple[str, str]] = Counter()

    def take(self, user: str, service: str, limit: int | None) -> bool:
        key = (user, service)
        if limit is not None and self.open[key] >= limit:
            return False
        self.open[key] += 1
        return True

    def give(self, user: str, service: str) -> None:
        key = (user, service)
        self.open[key] -= 1
        if self.open[key] <= 0:
            del self.open[key]

    def get(self, user: str, service: str) -> int:
        return self.open.get((user, service), 0)

    def __len__(self) -> int:
        return len(self.open)


class SharedCounts:
    """The counts of all worker processes, in memory they share (make it before forking)."""

    def __init__(self, slots: int = 1 << 16) -> None:
        if slots & (slots - 1):
            raise ValueError("slots must be a power of two")
        self.slots = slots
        self.mask = slots - 1
        self._map = mmap.mmap(-1, 16 * slots)  # anonymous and shared: seen by forked children
        self.table = memoryview(self._map).cast("q")  # [2*i] key (0: free), [2*i+1] count
        self.lock = multiprocessing.get_context("fork").Lock()

    @staticmethod
    def _key(user: str, service: str) -> int:
        return (hash((user, service)) & MASK63) | 1

    def _find(self, key: int) -> int:
        """The slot holding key, or the free slot where it would go; -1 when full."""
        t, i = self.table, key & self.mask
        for _ in range(self.slots):
            k = t[2 * i]
            if k == key or k == 0:
                return i
            i = (i + 1) & self.mask
        return -1

    def take(self, user: str, service: str, limit: int | None) -> bool:
        key = self._key(user, service)
        t = self.table
        with self.lock:
            i = self._find(key)
            if i < 0:
                return False  # 65,536 pairs with open connections: refuse rather than lose count
            if t[2 * i] == 0:
                t[2 * i], t[2 * i + 1] = key, 0
            if limit is not None and t[2 * i + 1] >= limit:
                if t[2 * i + 1] == 0:
                    self._free(i)  # a limit of 0 left a fresh slot behind
                return False
            t[2 * i + 1] += 1
            return True

    def give(self, user: str, service: str) -> None:
        key = self._key(user, service)
        t = self.table
        with self.lock:
            i = self._find(key)
            if i < 0 or t[2 * i] != key:
                return
            t[2 * i + 1] -= 1
            if t[2 * i + 1] <= 0:
                self._free(i)

    def get(self, user: str, service: str) -> int:
        key = self._key(user, service)
        with self.lock:
            i = self._find(key)
            return self.table[2 * i + 1] if i >= 0 and self.table[2 * i] == key else 0

    def _free(self, i: int) -> None:
        """Empty slot i and move later keys of its probe run back (Knuth's algorithm R)."""
        t, mask = self.table, self.mask
        j = i
        while True:
            j = (j + 1) & mask
            k = t[2 * j]
            if k == 0:
                break
            home = k & mask
            # the key at j may move to i unless its home lies cyclically in (i, j]
            if (i < j and i < home <= j) or (i > j and (home > i or home <= j)):
                continue
            t[2 * i], t[2 * i + 1] = k, t[2 * j + 1]
            i = j
        t[2 * i], t[2 * i + 1] = 0, 0

    def __len__(self) -> int:
        with self.lock:
            return sum(1 for i in range(self.slots) if self.table[2 * i] != 0)
