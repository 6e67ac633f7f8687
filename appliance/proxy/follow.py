"""Follow ended sessions so the relay closes what they still hold open.

Whichever process ends a session (the portal on logout or expiry, `appliance
sessions end`, the admin page, the lease follower) writes a session event in the
shared store; the proxy learns it here by following those events with the store's
one cursor (appliance/state/follow.py) a few times a second: one indexed range query
that usually returns nothing.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence

from appliance.state.follow import Cursor
from appliance.state.sessions import SessionEvent

log = logging.getLogger("appliance.proxy.follow")


class EndedFollower:
    """Calls `on_ended(events)` once for every session end after event `start`."""

    def __init__(
        self,
        read: Callable[[int, int], Sequence[SessionEvent]],
        start: int,
        on_ended: Callable[[list[SessionEvent]], object],
        period: float = 0.25,
    ) -> None:
        self.cursor = Cursor(read, start)
        self.on_ended = on_ended
        self.period = period

    def poll(self) -> int:
        """One round; returns how many sessions were newly seen ended."""
        events = self.cursor.drain()
        if events:
            self.on_ended(events)
        return len(events)

    async def run(self) -> None:
        while True:
            try:
                self.poll()
            except Exception as exc:  # a busy or broken store must not stop the relay
                log.warning("following ended sessions: %s", exc)
            await asyncio.sleep(self.period)


__all__ = ["EndedFollower"]
