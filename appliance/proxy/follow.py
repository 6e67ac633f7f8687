"""Follow ended sessions so the relay closes what they still hold open.

Whichever process ends a session (the portal on logout or expiry, `appliance
sessions end`, the admin page, the lease follower) only sets `ended` in the
shared store; the proxy learns it here by polling `ended_since(t)` a few times a
second: one indexed range query that usually returns nothing.  `ended` is the
ending process's clock and its commit may land after a later one, so each poll
looks back `overlap` seconds and remembers the ids it already handled.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence

log = logging.getLogger("appliance.proxy.follow")

Ended = tuple[str, str, float]  # session id, guest ip, when it ended


class EndedFollower:
    """Calls `on_ended(rows)` once for every newly ended session found by `source(since)`."""

    def __init__(
        self,
        source: Callable[[float], Sequence[Ended]],
        on_ended: Callable[[list[Ended]], object],
        period: float = 0.25,
        overlap: float = 5.0,
        start: float | None = None,
    ) -> None:
        self.source = source
        self.on_ended = on_ended
        self.period = period
        self.overlap = overlap
        self.newest = time.time() if start is None else start
        self.seen: dict[str, float] = {}

    def poll(self) -> int:
        """One round; returns how many sessions were newly seen ended."""
        fresh = [r for r in self.source(self.newest - self.overlap) if r[0] not in self.seen]
        if fresh:
            for sid, _ip, ended in fresh:
                self.seen[sid] = ended
                self.newest = max(self.newest, ended)
            self.on_ended(fresh)
        horizon = self.newest - 2 * self.overlap
        if len(self.seen) > 256:
            self.seen = {k: v for k, v in self.seen.items() if v > horizon}
        return len(fresh)

    async def run(self) -> None:
        while True:
            try:
                self.poll()
            except Exception as exc:  # a busy or broken store must not stop the relay
                log.warning("following ended sessions: %s", exc)
            await asyncio.sleep(self.period)


__all__ = ["Ended", "EndedFollower"]
