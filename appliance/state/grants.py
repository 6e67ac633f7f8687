"""The firewall's tables in the shared store: grants written at login, the net role's receipt.

`firewall_grants` holds, per session, the HMAC the portal wrote at login (appliance/net/
members.py says why and checks it); `firewall_members` is the net role's receipt of what
the kernel's `authenticated` set holds now, read by the portal and the admin role so they
know a login or logout reached the kernel.  This module is the only one that knows
their SQL.
"""

from __future__ import annotations

from appliance.state import leases
from appliance.state.connection import Connection

Pair = tuple[str, str]


def write_grant(conn: Connection, session_id: str, signature: str) -> None:
    conn.execute(
        "INSERT INTO firewall_grants (session_id, signature) VALUES (?, ?) "
        "ON CONFLICT (session_id) DO UPDATE SET signature = excluded.signature",
        (session_id, signature),
    )


def prune_grants(conn: Connection) -> None:
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
SELECT s.id, s.ip, s.mac, s.idle_expiry, s.absolute_expiry, lease.expires, g.signature
FROM sessions AS s
{leases.binding_join("s", ":now")}
JOIN firewall_grants AS g ON g.session_id = s.id
WHERE s.ended IS NULL AND s.idle_expiry > :now AND s.absolute_expiry > :now
"""


def granted_sessions(conn: Connection, now: float) -> list[tuple[str, str, str, float, str]]:
    """(session id, ip, mac, when it ends, grant) of every live session with a grant."""
    return [
        (str(sid), str(ip), str(mac), min(float(idle), float(end), float(lease)), str(sig))
        for sid, ip, mac, idle, end, lease, sig in conn.execute(_GRANTED, {"now": now})
    ]


def record(
    conn: Connection,
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
            "INSERT INTO firewall_members (ip, mac) VALUES (?, ?) ON CONFLICT DO NOTHING",
            sorted(adds),
        )
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def confirmed(conn: Connection, ip: str, mac: str) -> bool:
    """Whether the net role has put (ip, mac) into the kernel's set."""
    row = conn.execute(
        "SELECT 1 FROM firewall_members WHERE ip = ? AND mac = ?", (ip, mac)
    ).fetchone()
    return row is not None


def clear(conn: Connection) -> None:
    """No receipts: the set is gone or closed, nobody is confirmed."""
    conn.execute("DELETE FROM firewall_members")
