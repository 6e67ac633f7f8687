"""The firewall's tables in the shared store: grants written at login, the net role's receipt.

`firewall_grants` holds, per session, the HMAC the portal wrote at login (appliance/net/
members.py says why and checks it); `firewall_members` is the net role's receipt of what
the kernel's `authenticated` set holds now, read by the portal and the admin role so they
know a login or logout reached the kernel.  This module is the only one that knows
their SQL.
"""

from __future__ import annotations

import sqlite3

from appliance.state import leases
from appliance.state.sessions import SessionStore

Pair = tuple[str, str]

SCHEMA = """
CREATE TABLE IF NOT EXISTS firewall_members (
    ip TEXT NOT NULL,
    mac TEXT NOT NULL,
    PRIMARY KEY (ip, mac)
);
CREATE TABLE IF NOT EXISTS firewall_grants (
    session_id TEXT PRIMARY KEY,
    signature TEXT NOT NULL          -- HMAC-SHA256(key, "id ip mac"), hex
);
"""


def create_schema(conn: sqlite3.Connection) -> None:
    """The sessions and leases tables too: the net role may start before the others."""
    conn.executescript(SCHEMA)
    SessionStore(conn)  # creates the session and lease tables when missing


def write_grant(conn: sqlite3.Connection, session_id: str, signature: str) -> None:
    conn.execute(
        "INSERT OR REPLACE INTO firewall_grants (session_id, signature) VALUES (?, ?)",
        (session_id, signature),
    )


def prune_grants(conn: sqlite3.Connection) -> None:
    """Grants of ended sessions go, so reviving an ended session row opens nothing."""
    conn.execute(
        "DELETE FROM firewall_grants WHERE session_id NOT IN "
        "(SELECT id FROM sessions WHERE ended IS NULL)"
    )


# An active, unexpired session on the binding it was made in (same MAC, no new grant
# of the address since: the rule of `SessionStore.lookup_ip`), with its grant.  Read
# as one join: the net role runs it after every change to the store, so it must stay
# cheap with thousands of guests (SessionStore.list() parses every row's JSON).
_GRANTED = f"""
SELECT s.id, s.ip, s.mac, MIN(s.idle_expiry, s.absolute_expiry, lease.expires), g.signature
FROM sessions AS s
{leases.binding_join("s", ":now")}
JOIN firewall_grants AS g ON g.session_id = s.id
WHERE s.ended IS NULL AND s.idle_expiry > :now AND s.absolute_expiry > :now
"""


def granted_sessions(
    conn: sqlite3.Connection, now: float
) -> list[tuple[str, str, str, float, str]]:
    """(session id, ip, mac, when it ends, grant) of every live session with a grant."""
    return [
        (str(sid), str(ip), str(mac), float(ends), str(sig))
        for sid, ip, mac, ends, sig in conn.execute(_GRANTED, {"now": now}).fetchall()
    ]


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
