"""Which guest addresses are logged in, as the DNS role sees it: fail closed.

The truth is the sessions in the shared store (`SessionStore.lookup_ip`: an active,
unexpired session whose lease still binds the address).  Asking it costs two SQLite
queries, too much for every cached answer, so a yes is remembered in `known`
(address -> monotonic time until which it holds) for at most `TRUST` seconds and never
past the session's own expiry; a session ended by any role leaves `known` within one
`poll` (the service follows the ended sessions' events twice a second, with the store's
cursor, appliance/state/follow.py), which also asks again for the addresses about to
lapse.  A no is never remembered: the very next question after a login is answered as
a member's.

Unknown is not logged in: no store, a store that raises, no session, all mean the
guest gets the before-login answers.  `known` is read by the UDP thread without a
lock (one dict lookup, atomic under the GIL); only the event loop writes it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from appliance.state.follow import Cursor
from appliance.state.sessions import SessionEvent

log = logging.getLogger("appliance.dns")

TRUST = 5.0
"""Seconds a found session is trusted without asking again: bounds how long a lease
lapse not yet turned into an ended session keeps an address a member here."""


class Sessions(Protocol):
    def lookup_ip(self, ip: str) -> Any: ...
    def ended_after(self, last_id: int, limit: int) -> Sequence[SessionEvent]: ...
    def last_event(self) -> int: ...


class Logins:
    def __init__(self, sessions: Sessions | None, wall: Callable[[], float] = time.time) -> None:
        self.sessions = sessions
        self.wall = wall
        self.known: dict[str, float] = {}
        self.ended: Cursor[SessionEvent] | None = None  # made at the first poll
        self._failed_logged = -60.0

    def logged_in(self, ip: str, now: float) -> bool:
        """What is known without asking the store (the UDP thread's question)."""
        return self.known.get(ip, 0.0) > now

    def check(self, ip: str, now: float) -> bool:
        """Logged in?  Asks the store unless a recent yes is known; any failure is a no."""
        if self.known.get(ip, 0.0) > now:
            return True
        return self._ask(ip, now)

    def _ask(self, ip: str, now: float) -> bool:
        if self.sessions is None:
            return False
        try:
            session = self.sessions.lookup_ip(ip)
            left = None if session is None else float(session.expires()) - self.wall()
        except Exception as exc:
            self._failed(exc)
            self.known.pop(ip, None)
            return False
        if left is None or left <= 0:
            self.known.pop(ip, None)
            return False
        if len(self.known) > 65536:
            self.known.clear()
        self.known[ip] = now + min(TRUST, left)
        return True

    def poll(self, now: float, ahead: float = 1.0) -> None:
        """Forget the addresses whose session ended; ask again for those about to lapse
        (within `ahead` seconds), so a member's cached answers stay on the fast path."""
        if self.sessions is None:
            return
        try:
            if self.ended is None:
                self.ended = Cursor(self.sessions.ended_after, self.sessions.last_event())
                self.known.clear()  # (nothing known yet was learnt before this cursor)
            ended = self.ended.drain()
        except Exception as exc:
            self._failed(exc)
            self.known.clear()  # cannot tell who ended: nobody is trusted until asked again
            return
        for ev in ended:
            self.known.pop(ev.ip, None)
        for ip, until in list(self.known.items()):
            if until <= now + ahead:
                self._ask(ip, now)

    def _failed(self, exc: Exception) -> None:
        now = time.monotonic()
        if now - self._failed_logged >= 60:
            self._failed_logged = now
            log.warning("dns: cannot read the sessions (%s); guests count as not logged in", exc)


__all__ = ["TRUST", "Logins", "Sessions"]
