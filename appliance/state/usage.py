"""Per-user accounting by service: connections, bytes up and down, SMTP messages,
per UTC day and per session, in the shared state store.

The proxy's workers add to these tables in batches (appliance/proxy/accounting.py):
one transaction of UPSERTs every few seconds per worker, never a write per
connection.  Per-session totals live in their own table (`session_usage`), not in
columns of `sessions`: that table is written by the portal (create, touch, end) and
a session's usage is per service, so columns would not fit and every batch would
contend with the portal's writes on the same rows.  The days are UTC, as the access
log's times are.  The SQL is kept in this module only (PostgreSQL may replace
SQLite later).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from appliance.state.connection import Connection

_ADD_DAY = """
INSERT INTO usage (day, "user", service, connections, bytes_up, bytes_down, messages)
VALUES (?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (day, "user", service) DO UPDATE SET
    connections = usage.connections + excluded.connections,
    bytes_up = usage.bytes_up + excluded.bytes_up,
    bytes_down = usage.bytes_down + excluded.bytes_down,
    messages = usage.messages + excluded.messages
"""

_ADD_SESSION = """
INSERT INTO session_usage (session, service, "user", connections, bytes_up, bytes_down, messages)
VALUES (?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (session, service) DO UPDATE SET
    connections = session_usage.connections + excluded.connections,
    bytes_up = session_usage.bytes_up + excluded.bytes_up,
    bytes_down = session_usage.bytes_down + excluded.bytes_down,
    messages = session_usage.messages + excluded.messages
"""

CSV_HEADER = ("day", "user", "service", "connections", "bytes_up", "bytes_down", "messages")


@dataclass(frozen=True)
class Entry:
    """One batch line: what a worker counted for (day, user, service, session)."""

    day: str
    user: str
    service: str
    session: str | None
    connections: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    messages: int = 0


@dataclass(frozen=True)
class Usage:
    """Totals of one user and service (or of one day, in a series)."""

    user: str
    service: str
    connections: int
    bytes_up: int
    bytes_down: int
    messages: int

    @property
    def bytes(self) -> int:
        return self.bytes_up + self.bytes_down


def day_of(when: float | None = None) -> str:
    """The UTC day a time falls on, as the tables key it."""
    return time.strftime("%Y-%m-%d", time.gmtime(time.time() if when is None else when))


def days_back(n: int, now: float | None = None) -> tuple[str, str]:
    """(first, last) day of the `n` days ending today (n = 1: today alone)."""
    now = time.time() if now is None else now
    return day_of(now - 86400 * (n - 1)), day_of(now)


def add(conn: Connection, batch: Iterable[Entry]) -> int:
    """Add a batch in one transaction (UPSERTs that add to what is there); how many lines."""
    days: list[tuple[object, ...]] = []
    sessions: list[tuple[object, ...]] = []
    for e in batch:
        counts = (e.connections, e.bytes_up, e.bytes_down, e.messages)
        days.append((e.day, e.user, e.service, *counts))
        if e.session:
            sessions.append((e.session, e.service, e.user, *counts))
    if not days:
        return 0
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.executemany(_ADD_DAY, days)
        conn.executemany(_ADD_SESSION, sessions)
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
    return len(days)


def _usage(row: tuple[object, ...]) -> Usage:
    return Usage(
        str(row[0]),
        str(row[1]),
        int(row[2]),  # type: ignore[call-overload]
        int(row[3]),  # type: ignore[call-overload]
        int(row[4]),  # type: ignore[call-overload]
        int(row[5]),  # type: ignore[call-overload]
    )


_SUMS = "SUM(connections), SUM(bytes_up), SUM(bytes_down), SUM(messages)"


def by_user_service(conn: Connection, first: str, last: str) -> list[Usage]:
    """Each user's totals per service over the days first..last (inclusive), by user."""
    rows = conn.execute(
        f'SELECT "user", service, {_SUMS} FROM usage WHERE day BETWEEN ? AND ? '
        'GROUP BY "user", service ORDER BY "user", service',
        (first, last),
    ).fetchall()
    return [_usage(r) for r in rows]


def daily(conn: Connection, user: str, first: str, last: str) -> list[tuple[str, int, int]]:
    """(day, bytes up, bytes down) of one user, all services, per day with traffic."""
    rows = conn.execute(
        "SELECT day, SUM(bytes_up), SUM(bytes_down) FROM usage "
        'WHERE "user" = ? AND day BETWEEN ? AND ? GROUP BY day ORDER BY day',
        (user, first, last),
    ).fetchall()
    return [(str(r[0]), int(r[1]), int(r[2])) for r in rows]


def bytes_today(conn: Connection, user: str, service: str, day: str) -> int:
    """Bytes both ways of one user and service on one day (what a quota compares)."""
    row = conn.execute(
        'SELECT bytes_up + bytes_down FROM usage WHERE day = ? AND "user" = ? AND service = ?',
        (day, user, service),
    ).fetchone()
    return int(row[0]) if row else 0


def bytes_of_day(conn: Connection, day: str) -> dict[tuple[str, str], int]:
    """Every (user, service)'s bytes both ways on one day (the relay's quota view)."""
    rows = conn.execute(
        'SELECT "user", service, bytes_up + bytes_down FROM usage WHERE day = ?', (day,)
    ).fetchall()
    return {(str(r[0]), str(r[1])): int(r[2]) for r in rows}


def of_session(conn: Connection, session: str) -> list[Usage]:
    """One session's totals per service."""
    rows = conn.execute(
        f'SELECT "user", service, {_SUMS} FROM session_usage WHERE session = ? '
        'GROUP BY "user", service ORDER BY service',
        (session,),
    ).fetchall()
    return [_usage(r) for r in rows]


def csv_rows(conn: Connection, first: str, last: str) -> Iterator[tuple[object, ...]]:
    """The export: CSV_HEADER, then one row per (day, user, service) of first..last."""
    yield CSV_HEADER
    yield from conn.execute(
        'SELECT day, "user", service, connections, bytes_up, bytes_down, messages FROM usage '
        'WHERE day BETWEEN ? AND ? ORDER BY day, "user", service',
        (first, last),
    )


__all__ = [
    "CSV_HEADER",
    "Entry",
    "Usage",
    "add",
    "by_user_service",
    "bytes_of_day",
    "bytes_today",
    "csv_rows",
    "daily",
    "day_of",
    "days_back",
    "of_session",
]
