"""What the new active box of a pair does to the store before it writes: end the
other box's database sessions.

A box that dies (power, kill -9, its links down) leaves its connections to PostgreSQL
open on the server, which learns of the death only when TCP gives up (hours, by
default).  One of them may hold the store's write lock in the middle of a group
commit, and then every write of the new active box waits for a lock that is never
let go.  PostgreSQL lets a role end its own role's other sessions, so the new active
box ends every session from the other box's address: a dead box loses nothing (its
open transaction is rolled back; nothing of it was ever ACKed), and a live one (both
active at once) connects again at its next statement.  On SQLite there is one box.
"""

from __future__ import annotations

from collections.abc import Sequence
from ipaddress import IPv4Address

from appliance.state.connection import Connection, is_sqlite


def end_peer_sessions(conn: Connection, peers: Sequence[IPv4Address]) -> int:
    """End the sessions of this store's role that come from `peers`; how many ended."""
    if is_sqlite(conn) or not peers:
        return 0
    marks = ", ".join("?" * len(peers))
    rows = conn.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE usename = current_user AND pid <> pg_backend_pid() "
        f"AND host(client_addr) IN ({marks})",
        tuple(str(p) for p in peers),
    ).fetchall()
    return sum(1 for (ended,) in rows if ended)
