"""What the new active box of a pair does to the store before it writes: end the
other box's database sessions, and whatever session still holds the write lock.

A box that dies (power, kill -9, its links down) leaves its connections to PostgreSQL
open on the server, which learns of the death only when TCP gives up (hours, by
default).  One of them may hold the store's write lock (the advisory lock `WRITE_LOCK`
of appliance/state/postgres.py) in the middle of a group commit, and then every write
of the new active box waits for a lock that is never let go.  So the new active box
ends

- every session of the store's role that comes from the other box's address, and
- every other session that holds the write lock, whatever its role or address: the
  other box's connection may reach the server through NAT or a pooler, over IPv6, or
  as another role, and then its address says nothing.  Only the active box calls this
  (the caller's guarantee), so a lock holder is either the other box (which must not
  write now) or a writer of this box, which is rolled back and writes again.

A dead box loses nothing (its open transaction is rolled back; nothing of it was ever
ACKed), and a live one (both active at once) connects again at its next statement.
All are signalled at once, then waited for together until they are gone (at most
TERMINATE_WAIT_MS), so the lock is free when this returns.  A session the store will
not let this role end is logged and skipped, and so is a write lock still held when
nothing could be ended: writes will wait for it.  Sessions of this box's other roles
that do not hold the lock are never ended (they come from this box's own address).
On SQLite there is one box.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from ipaddress import IPv4Address

from appliance.state.connection import STORE_ERRORS, Connection, is_sqlite
from appliance.state.postgres import WRITE_LOCK

log = logging.getLogger("appliance.state.takeover")

TERMINATE_WAIT_MS = 3000  # how long to wait for the ended sessions to be gone

# PostgreSQL keeps a one-bigint advisory key as classid = its high 32 bits, objid = its
# low 32 bits (both as unsigned oids), objsubid = 1 (two-int4 keys have objsubid = 2).
_KEY = WRITE_LOCK & 0xFFFF_FFFF_FFFF_FFFF
_HOLDS_WRITE_LOCK = (
    "l.locktype = 'advisory' AND l.granted AND l.pid IS NOT NULL "
    "AND l.pid <> pg_backend_pid() "
    "AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) "
    f"AND l.classid = {_KEY >> 32} AND l.objid = {_KEY & 0xFFFF_FFFF} AND l.objsubid = 1"
)


def end_peer_sessions(conn: Connection, peers: Sequence[IPv4Address]) -> int:
    """End the sessions of this store's role that come from `peers`, and any other
    session that holds the store's write lock; how many ended (each one gone)."""
    if is_sqlite(conn) or not peers:
        return 0
    marks = ", ".join("?" * len(peers))
    pids = [
        pid
        for (pid,) in conn.execute(
            "SELECT pid FROM pg_stat_activity "
            "WHERE usename = current_user AND pid <> pg_backend_pid() "
            f"AND host(client_addr) IN ({marks}) "
            f"UNION SELECT l.pid FROM pg_locks l WHERE {_HOLDS_WRITE_LOCK}",
            tuple(str(p) for p in peers),
        ).fetchall()
    ]
    signalled: list[int] = []
    for pid in sorted(pids):  # all of them at once, then wait for them together
        try:  # int4, not INTEGER: the store's SQL translation makes INTEGER a BIGINT
            row = conn.execute("SELECT pg_terminate_backend(?::int4)", (pid,)).fetchone()
        except STORE_ERRORS as exc:  # e.g. another role's session, without the right
            log.warning("could not end store session %d: %s", pid, exc)
            continue
        if row is not None and row[0]:
            signalled.append(pid)
    deadline = time.monotonic() + TERMINATE_WAIT_MS / 1000
    waiting = set(signalled)
    while waiting and time.monotonic() < deadline:
        marks = ", ".join("?" * len(waiting))
        rows = conn.execute(
            f"SELECT pid FROM pg_stat_activity WHERE pid IN ({marks})", tuple(waiting)
        ).fetchall()
        waiting = {int(pid) for (pid,) in rows}
        if waiting:
            time.sleep(0.01)
    if waiting:
        log.warning("store sessions %s did not end in %d ms", sorted(waiting), TERMINATE_WAIT_MS)
    ended = len(signalled) - len(waiting)
    if not ended:
        holders = conn.execute(
            "SELECT l.pid, a.usename, host(a.client_addr) FROM pg_locks l "
            f"LEFT JOIN pg_stat_activity a ON a.pid = l.pid WHERE {_HOLDS_WRITE_LOCK}"
        ).fetchall()
        if holders:
            log.warning(
                "taking over: no store session ended, and the write lock is held by %s: "
                "writes wait for it",
                ", ".join(
                    f"pid {p} ({u or '?'} from {h or 'no address shown'})" for p, u, h in holders
                ),
            )
    return ended
