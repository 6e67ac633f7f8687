"""Who belongs in `authenticated`, worked out from the store, and the net role's receipt.

The sessions in the store are the truth; the nftables set is their image in the
kernel.  Only the net role writes that set: it computes the pairs here (an active,
unexpired session whose lease still binds it, the rule `SessionStore.lookup_ip`
applies), puts them into the set, and then records what the kernel now holds in
the `firewall_members` table.  The portal and the admin role read that receipt to
know a login or a logout has reached the kernel, so they need no CAP_NET_ADMIN;
and a restarted net role rebuilds the set from the sessions, so nobody who is
online loses access with it.
"""

from __future__ import annotations

import logging
import sqlite3

from appliance.net.setup import check_pair
from appliance.sessions import SessionStore
from dhcp import leases

log = logging.getLogger("appliance.net.members")

Pair = tuple[str, str]

SCHEMA = """
CREATE TABLE IF NOT EXISTS firewall_members (
    ip TEXT NOT NULL,
    mac TEXT NOT NULL,
    PRIMARY KEY (ip, mac)
);
"""


def create_schema(conn: sqlite3.Connection) -> None:
    """The sessions and leases tables too: the net role may start before the others."""
    conn.executescript(SCHEMA)
    SessionStore(conn)  # creates the session and lease tables when missing


def wanted(conn: sqlite3.Connection, now: float) -> tuple[set[Pair], float | None]:
    """The pairs that belong in `authenticated`, and when that next changes by the clock.

    Two reads (sessions, leases) joined here, so the cost stays linear in the
    number of guests however often the store changes."""
    st = SessionStore(conn)  # (its schema script commits: before the snapshot)
    conn.execute("BEGIN")  # one snapshot: sessions and leases agree
    try:
        sessions = st.list()
        bound = {
            lease.ip: lease
            for lease in leases.all_leases(conn)
            if lease.state == "bound" and lease.expires > now
        }
    finally:
        conn.execute("COMMIT")
    out: set[Pair] = set()
    due: float | None = None
    for sess in sessions:
        if sess.expires() <= now:
            continue
        lease = bound.get(sess.ip)
        # the binding the session was made in: same MAC, and no new grant since
        if lease is None or lease.mac != sess.mac.lower() or lease.bound_since > sess.created:
            continue
        try:
            out.add(check_pair(sess.ip, sess.mac))
        except ValueError:
            log.warning("ignoring a session with a bad address: %r %r", sess.ip, sess.mac)
            continue
        ends = min(sess.expires(), lease.expires)
        due = ends if due is None else min(due, ends)
    return out, due


def record(
    conn: sqlite3.Connection,
    adds: set[Pair],
    dels: set[Pair],
    replace: bool = False,
) -> None:
    """Write the receipt after the kernel took the change (`replace`: the whole set)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        if replace:
            conn.execute("DELETE FROM firewall_members")
        conn.executemany("DELETE FROM firewall_members WHERE ip = ? AND mac = ?", sorted(dels))
        conn.executemany(
            "INSERT OR IGNORE INTO firewall_members (ip, mac) VALUES (?, ?)", sorted(adds)
        )
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def confirmed(conn: sqlite3.Connection, ip: str, mac: str) -> bool:
    """Whether the net role has put (ip, mac) into the kernel's set."""
    row = conn.execute(
        "SELECT 1 FROM firewall_members WHERE ip = ? AND mac = ?", (ip, mac)
    ).fetchone()
    return row is not None


def clear(conn: sqlite3.Connection) -> None:
    """No receipts: the set is gone or closed, nobody is confirmed."""
    conn.execute("DELETE FROM firewall_members")
