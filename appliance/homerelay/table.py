"""The relay's registration table (seed 003): who owns each household name, and presence.

Sans-IO: the caller passes `now`.  A name belongs to the first key that registers it
(claims are persisted, so a restart hands no name to a squatter); a registration with
the owner's key replaces the owner's current link at once (takeover).  Only the owner's
own attempts count towards the per-household rate limit, so nobody else can lock a
household out by spamming registrations for its name.

Persistence goes through `HouseholdStore` (appliance/state/households.py).  In a
federation (docs/home-relay.md "Federation") the table also knows which other relay
holds a household's link (`remote`), from the store's events (`apply`); the most recent
registration wins wherever it was made, so an agent that moved to another relay takes
its name over from its stale link here at once.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol

from appliance.homelink.frames import Reset
from appliance.homelink.registration import CLOSE_CLAIMED, CLOSE_TOO_MANY, RegistrationRefused
from appliance.state.households import Claim, LinkEvent

MAX_ATTEMPTS = 4  # registrations per household ...
ATTEMPT_WINDOW = 10.0  # ... in this many seconds
MAX_STREAMS = 64  # open streams per household
MAX_CLAIMS = 100_000  # household names one relay hands out


class NameMoved(Exception):
    """The store says another key owns the name now: the registration is refused."""


class State(StrEnum):
    ONLINE = "online"
    OFFLINE = "offline"
    IN_USE = "in_use"


class HouseholdStore(Protocol):
    """Where claims live across restarts."""

    def load(self) -> list[Claim]: ...
    def claim(self, name: str, key: str, claimed_at: float) -> str:
        """Claim `name` for `key` if free; returns the key that owns it now."""
        ...

    def owner(self, name: str) -> str:
        """The key that owns `name` in the store ('' for a name nobody owns)."""
        ...

    def rekey(self, name: str, old: str, new: str) -> str:
        """Move `name` from `old` to `new` if `old` owns it; returns the key that owns it now."""
        ...

    def linked(self, name: str, key: str, relay: str, now: float) -> int: ...
    def unlinked(self, name: str, key: str, relay: str, now: float) -> bool: ...


@dataclass(slots=True)
class _Household:
    key: str
    last_seen: float
    link_id: int | None = None
    remote: str = ""  # the other relay that holds the household's link ('' none)
    since: int = 0  # the store's event of this relay's latest link of it (older: stale)
    streams: int = 0
    attempts: deque[float] = field(default_factory=deque)


class Registrations:
    """The table in memory, written through to `store` on claim and on going offline."""

    def __init__(
        self,
        store: HouseholdStore | None = None,
        *,
        me: str = "local",
        max_attempts: int = MAX_ATTEMPTS,
        attempt_window: float = ATTEMPT_WINDOW,
        max_streams: int = MAX_STREAMS,
        max_claims: int = MAX_CLAIMS,
    ) -> None:
        self.store = store
        self.me = me  # this relay's name in the store (its federation name)
        # whether a relay of the federation still beats (its households count offline
        # when not): the server keeps it current from the heartbeats
        self.alive: Callable[[str], bool] = lambda _relay: True
        self.max_attempts = max_attempts
        self.attempt_window = attempt_window
        self.max_streams = max_streams
        self.max_claims = max_claims
        self._households: dict[str, _Household] = {}
        self.rekeyed = 0  # names moved to a renewed certificate's key
        for c in store.load() if store else []:
            remote = c.relay if c.relay != me else ""
            self._households[c.name] = _Household(c.key, c.last_seen, remote=remote)

    def claim_or_check(
        self, household: str, key: str, now: float, previous: str = ""
    ) -> RegistrationRefused | None:
        """After a verified registration: None when `key` may use the name (claiming it
        if free, or taking it over from `previous`, the key of the certificate it
        renewed, when that one owns it), else the refusal to close the link with (4403,
        4429)."""
        entry = self._households.get(household)
        if entry is not None and self.store is not None:
            # the store is the truth: another relay may have moved the name, or the
            # operator freed it, since this relay loaded it
            owner = self.store.owner(household)
            if owner:
                entry.key = owner
            elif entry.link_id is None:
                del self._households[household]
                entry = None
        if entry is not None and entry.key != key and (not previous or entry.key != previous):
            return RegistrationRefused(CLOSE_CLAIMED, "household name claimed by another key")
        if entry is None:
            if len(self._households) >= self.max_claims:
                return RegistrationRefused(CLOSE_TOO_MANY, "this relay holds no more names")
            owner = self.store.claim(household, key, now) if self.store else key
            entry = self._households[household] = _Household(owner, now)
            if owner != key:  # claimed meanwhile through another relay on the same store
                return RegistrationRefused(CLOSE_CLAIMED, "household name claimed by another key")
        while entry.attempts and entry.attempts[0] <= now - self.attempt_window:
            entry.attempts.popleft()
        if len(entry.attempts) >= self.max_attempts:
            return RegistrationRefused(CLOSE_TOO_MANY, "too many registrations; wait")
        entry.attempts.append(now)
        if entry.key != key:  # `previous` owns the name: it moves to the renewed key
            entry.key = self.store.rekey(household, previous, key) if self.store else key
            if entry.key != key:  # another relay moved it first
                return RegistrationRefused(CLOSE_CLAIMED, "household name claimed by another key")
            self.rekeyed += 1
        return None

    def online(self, household: str, key: str, link_id: int, now: float) -> int | None:
        """`link_id` now carries the household; returns the link it replaces (to close)."""
        entry = self._households[household]
        if entry.key != key:
            raise ValueError("online() for a key that does not own the household")
        if self.store:  # first: a store that fails changes nothing here
            since = self.store.linked(household, key, self.me, now)
            if not since:  # the store's row names another key now (moved meanwhile)
                raise NameMoved(household)
            entry.since = since
        previous = entry.link_id
        entry.link_id = link_id
        entry.remote = ""
        entry.last_seen = now
        return previous if previous != link_id else None

    def offline(self, household: str, link_id: int, now: float) -> bool:
        """The link ended; False (nothing changes) when it had already been replaced."""
        entry = self._households.get(household)
        if entry is None or entry.link_id != link_id:
            return False
        entry.link_id = None
        entry.last_seen = now
        if self.store:
            self.store.unlinked(household, entry.key, self.me, now)
        return True

    def apply(self, event: LinkEvent) -> int | None:
        """Another relay's change, from the store: the local link it replaces (to close:
        the household registered there after it registered here), if any."""
        if event.relay == self.me:
            return None
        current = self._households.get(event.name)
        if current is not None and event.id <= current.since:
            return None  # made before this relay's own latest link of the household
        entry = self._households.get(event.name)
        if entry is None:  # claimed through another relay since this one loaded
            entry = self._households[event.name] = _Household(event.key, event.at)
        if entry.key != event.key:
            if not event.linked:
                return None  # a link of a key that no longer owns the name ended
            # the store lets only the owner link (linked() matches the key), so a link
            # by another key means the name was moved to it (a renewed certificate)
            entry.key = event.key
        entry.last_seen = max(entry.last_seen, event.at)
        if not event.linked:
            if entry.remote == event.relay:
                entry.remote = ""
            return None
        entry.remote = event.relay
        replaced, entry.link_id = entry.link_id, None
        return replaced

    def where(self, household: str) -> str | None:
        """Who holds the household's link: '' this relay, a relay's name, None nobody
        (or a relay that stopped beating)."""
        entry = self._households.get(household)
        if entry is None:
            return None
        if entry.link_id is not None:
            return ""
        if entry.remote and self.alive(entry.remote):
            return entry.remote
        return None

    def link(self, household: str) -> int | None:
        entry = self._households.get(household)
        return entry.link_id if entry else None

    def streams_opened(self, household: str, now: float) -> Reset | None:
        """Count a new stream to the household; the RESET to answer the OPEN with if not."""
        entry = self._households.get(household)
        if entry is None or entry.link_id is None:
            return Reset.OFFLINE
        if entry.streams >= self.max_streams:
            return Reset.LIMIT
        entry.streams += 1
        entry.last_seen = now
        return None

    def streams_closed(self, household: str, now: float) -> None:
        entry = self._households.get(household)
        if entry is not None and entry.streams > 0:
            entry.streams -= 1
            entry.last_seen = now

    def states(self) -> dict[str, int]:
        """How many claimed households are online, in use and offline (for metrics)."""
        counts = dict.fromkeys((str(s) for s in State), 0)
        counts["elsewhere"] = 0  # online at another relay of the federation
        for entry in list(self._households.values()):
            if entry.link_id is None and entry.remote and self.alive(entry.remote):
                counts["elsewhere"] += 1
            elif entry.link_id is None:
                counts[str(State.OFFLINE)] += 1
            else:
                counts[str(State.IN_USE if entry.streams else State.ONLINE)] += 1
        return counts

    def presence(self, household: str, now: float | None = None) -> dict[str, object] | None:
        """The answer to GET /v1/households/NAME; None (404) for a name never claimed.
        An online household is seen `now` when given."""
        entry = self._households.get(household)
        if entry is None:
            return None
        where = self.where(household)
        # (the streams to a household at another relay are counted there)
        busy = State.IN_USE if entry.streams else State.ONLINE
        state = State.OFFLINE if where is None else busy
        seen = now if now is not None and where is not None else entry.last_seen
        return {"household": household, "state": str(state), "last_seen": int(seen)}
