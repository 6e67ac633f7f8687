"""The home relay's claims in its store: which key owns each household name, last seen.

The relay keeps presence in memory (appliance/homerelay/table.py); only claims outlive a
restart, so a squatter cannot take a name while the relay is down.  This module is the
only one that knows their SQL.
"""

from __future__ import annotations

from dataclasses import dataclass

from appliance.core.config import StateConfig
from appliance.state import schema, store
from appliance.state.connection import Connection


@dataclass(frozen=True, slots=True)
class Claim:
    name: str
    key: str
    claimed_at: float
    last_seen: float


class Households:
    """All the relay's SQL: one table, in its SQLite file (WAL) or on PostgreSQL."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    @classmethod
    def open(cls, state: StateConfig) -> Households:
        return cls(store.open_store(state, tables=schema.RELAY, followed=()))

    def load(self) -> list[Claim]:
        rows = self.conn.execute("SELECT name, key, claimed_at, last_seen FROM households")
        return [Claim(str(n), str(k), float(c), float(s)) for n, k, c, s in rows]

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

    def seen(self, name: str, last_seen: float) -> None:
        self.conn.execute("UPDATE households SET last_seen = ? WHERE name = ?", (last_seen, name))

    def close(self) -> None:
        self.conn.close()
