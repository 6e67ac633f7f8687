"""The home relay's claims in its store: which key owns each household name, last seen.

The relay keeps presence in memory (appliance/homerelay/table.py); only claims outlive a
restart, so a squatter cannot take a name while the relay is down.  This module is the
only one that knows their SQL.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from appliance.state import schema
from appliance.state.store import connect


@dataclass(frozen=True, slots=True)
class Claim:
    name: str
    key: str
    claimed_at: float
    last_seen: float


class SqliteHouseholds:
    """All the relay's SQL: one table in one SQLite file (WAL)."""

    def __init__(self, path: str | Path) -> None:
        self.conn = connect(path)
        schema.upgrade(self.conn, schema.RELAY)

    def load(self) -> list[Claim]:
        rows = self.conn.execute("SELECT name, key, claimed_at, last_seen FROM households")
        return [Claim(str(n), str(k), float(c), float(s)) for n, k, c, s in rows]

    def claim(self, name: str, key: str, claimed_at: float) -> None:
        self.conn.execute(
            "INSERT INTO households (name, key, claimed_at, last_seen) VALUES (?, ?, ?, ?)",
            (name, key, claimed_at, claimed_at),
        )

    def seen(self, name: str, last_seen: float) -> None:
        self.conn.execute("UPDATE households SET last_seen = ? WHERE name = ?", (last_seen, name))

    def close(self) -> None:
        self.conn.close()
