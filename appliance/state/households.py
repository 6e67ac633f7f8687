"""The home relay's households in its store: who owns each name, which relay holds its
agent link, and the events that announce each change of that to the other relays.

A lone relay keeps presence in memory (appliance/homerelay/table.py) and needs only the
claims to outlive a restart, so a squatter cannot take a name while it is down.
Federated relays (docs/home-relay.md "Federation") share one PostgreSQL store: each
writes which relay holds a household's link (`relay`, '' for none) with an event row
in the same transaction, and the others follow the events by id (appliance/state/
follow.py), woken by NOTIFY.  The writers take the store's write lock (`BEGIN
IMMEDIATE`), so event ids commit in order and a follower never skips one.  This module
is the only one that knows their SQL.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

from appliance.core.config import StateConfig
from appliance.state import schema, store
from appliance.state.connection import Connection, is_sqlite

EVENTS_KEPT = 3600.0  # seconds of household events kept for followers that fell behind


@dataclass(frozen=True, slots=True)
class Claim:
    name: str
    key: str
    claimed_at: float
    last_seen: float
    relay: str = ""  # the relay that last said it holds the household's link ('' none)


@dataclass(frozen=True, slots=True)
class LinkEvent:
    """At `at`, `relay` took the household's agent link (`linked`) or its link ended."""

    id: int
    name: str
    key: str
    relay: str
    linked: bool
    at: float


_CLAIMS = "SELECT name, key, claimed_at, last_seen, relay FROM households"


def _claim(row: Sequence[Any]) -> Claim:
    name, key, claimed_at, last_seen, relay = row
    return Claim(str(name), str(key), float(claimed_at), float(last_seen), str(relay))


class Households:
    """All the relay's SQL, in its SQLite file (WAL) or on PostgreSQL."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    @classmethod
    def open(cls, state: StateConfig) -> Households:
        followed = schema.RELAY_FOLLOWED if state.backend == "postgresql" else ()
        return cls(store.open_store(state, tables=schema.RELAY, followed=followed))

    def load(self) -> list[Claim]:
        return [_claim(row) for row in self.conn.execute(_CLAIMS).fetchall()]

    def claim(self, name: str, key: str, claimed_at: float) -> str:
        """Claim `name` for `key` unless it is claimed already (by another relay on the
        same store, say); returns the key that owns it now."""
        self.conn.execute(
            "INSERT INTO households (name, key, claimed_at, last_seen) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (name) DO NOTHING",
            (name, key, claimed_at, claimed_at),
        )
        row = self.conn.execute("SELECT key FROM households WHERE name = ?", (name,)).fetchone()
        return str(row[0])

    def owner(self, name: str) -> str:
        row = self.conn.execute("SELECT key FROM households WHERE name = ?", (name,)).fetchone()
        return str(row[0]) if row else ""

    def claimed(self, name: str) -> Claim | None:
        row = self.conn.execute(_CLAIMS + " WHERE name = ?", (name,)).fetchone()
        return None if row is None else _claim(row)

    def release(self, name: str) -> bool:
        """Free `name` unless a relay holds its link now (its household lost the key it
        was claimed with: the next registration claims it anew)."""
        gone = self.conn.execute(
            "DELETE FROM households WHERE name = ? AND relay = ''", (name,)
        ).rowcount
        return bool(gone)

    def give(self, name: str, key: str, now: float) -> bool:
        """Claim `name` for `key` on the operator's word (a household's new agent),
        unless a relay holds its link now."""
        if self.conn.execute(
            "UPDATE households SET key = ?, claimed_at = ? WHERE name = ? AND relay = ''",
            (key, now, name),
        ).rowcount:
            return True
        return self.claim(name, key, now) == key

    def rekey(self, name: str, old: str, new: str) -> str:
        """Move `name` to `new` if `old` owns it (a renewed certificate, proven by the
        old one's key); returns the key that owns it now."""
        self.conn.execute(
            "UPDATE households SET key = ? WHERE name = ? AND key = ?", (new, name, old)
        )
        return self.owner(name)

    def linked(self, name: str, key: str, relay: str, now: float) -> int:
        """`relay` holds the household's agent link from now on (announced); returns the
        event's id (the other relays' older events are older than this link)."""
        return self._write(
            "UPDATE households SET relay = ?, last_seen = ? WHERE name = ? AND key = ?",
            (relay, now, name, key),
            LinkEvent(0, name, key, relay, True, now),
        )

    def unlinked(self, name: str, key: str, relay: str, now: float) -> bool:
        """`relay`'s link of the household ended; False (nothing written) when another
        relay has taken the household over meanwhile."""
        return (
            self._write(
                "UPDATE households SET relay = '', last_seen = ? WHERE name = ? AND relay = ?",
                (now, name, relay),
                LinkEvent(0, name, key, relay, False, now),
            )
            > 0
        )

    def _write(self, update: str, params: tuple[object, ...], event: LinkEvent) -> int:
        """The update and, if it changed a row, its event: the event's id (0: none)."""
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            written = 0
            if self.conn.execute(update, params).rowcount > 0:
                row = self.conn.execute(
                    "INSERT INTO household_events (name, key, relay, linked, at) "
                    "VALUES (?, ?, ?, ?, ?) RETURNING id",
                    (event.name, event.key, event.relay, int(event.linked), event.at),
                ).fetchone()
                written = int(row[0])
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")
        return written

    def release_all(self, relay: str, now: float) -> int:
        """At a relay's start: it holds no link, whatever its rows say (it was killed)."""
        rows = self.conn.execute(
            "SELECT name, key FROM households WHERE relay = ?", (relay,)
        ).fetchall()
        return sum(self.unlinked(str(n), str(k), relay, now) for n, k in rows)

    def last_event(self) -> int:
        row = self.conn.execute("SELECT MAX(id) FROM household_events").fetchone()
        return int(row[0]) if row and row[0] is not None else 0

    def events_after(self, last: int, limit: int) -> list[LinkEvent]:
        rows = self.conn.execute(
            "SELECT id, name, key, relay, linked, at FROM household_events WHERE id > ? "
            "ORDER BY id LIMIT ?",
            (last, limit),
        ).fetchall()
        return [
            LinkEvent(int(i), str(n), str(k), str(r), bool(lk), float(a))
            for i, n, k, r, lk, a in rows
        ]

    def prune_events(self, before: float) -> None:
        self.conn.execute("DELETE FROM household_events WHERE at < ?", (before,))

    def heartbeat(self, relay: str, url: str, now: float) -> None:
        """`relay` is alive and reached by its peers at `url`."""
        self.conn.execute(
            "INSERT INTO relays (name, url, seen) VALUES (?, ?, ?) "
            "ON CONFLICT (name) DO UPDATE SET url = excluded.url, seen = excluded.seen",
            (relay, url, now),
        )

    def relays(self) -> dict[str, tuple[str, float]]:
        """Every relay of the federation: its peer URL and its last heartbeat."""
        rows = self.conn.execute("SELECT name, url, seen FROM relays").fetchall()
        return {str(n): (str(u), float(s)) for n, u, s in rows}

    def wait(self, timeout: float) -> None:
        """Until another relay may have written (PostgreSQL: its NOTIFY came), at most
        `timeout` seconds (SQLite, one relay alone: just the time)."""
        if is_sqlite(self.conn):
            time.sleep(timeout)
            return
        from appliance.state.postgres import PgConnection

        cast(PgConnection, self.conn).wait(timeout)

    def close(self) -> None:
        self.conn.close()
