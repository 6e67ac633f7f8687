"""The admin audit log in the shared store: one row per change (admin, time, what, diff).

Append-only by use: nothing here updates or deletes a row.  In the store rather than a
file so that every appliance on a shared store shows one log (issue #18), and so that
the log is covered by the same backups and the same durability as the sessions.
Passwords and cookies never go in it (admin account changes are logged by name only).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

from appliance.state.connection import Connection


@dataclass(frozen=True)
class Entry:
    time: float
    admin: str
    action: str
    target: str
    diff: str

    @property
    def when(self) -> str:
        return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.time))


def append(conn: Connection, entries: Iterable[Entry]) -> None:
    """Add entries in one transaction (several: the import of an old audit.log)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.executemany(
            "INSERT INTO audit (time, admin, action, target, diff) VALUES (?, ?, ?, ?, ?)",
            [(e.time, e.admin, e.action, e.target, e.diff) for e in entries],
        )
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def newest(conn: Connection, limit: int = 200) -> list[Entry]:
    """The newest entries first."""
    rows = conn.execute(
        "SELECT time, admin, action, target, diff FROM audit ORDER BY time DESC, id DESC LIMIT ?",
        (limit,),
    ).fetchall()
    return [Entry(float(t), str(a), str(act), str(tg), str(d)) for t, a, act, tg, d in rows]


def is_empty(conn: Connection) -> bool:
    return conn.execute("SELECT 1 FROM audit LIMIT 1").fetchone() is None
