"""Who belongs in `authenticated`, worked out from the store, and the net role's receipt.

The sessions in the store are the truth; the nftables set is their image in the
kernel.  Only the net role writes that set: it computes the pairs here (an active,
unexpired session whose lease still binds it, the rule `SessionStore.lookup_ip`
applies), puts them into the set, and then records what the kernel now holds in
the `firewall_members` table.  The portal and the admin role read that receipt to
know a login or a logout has reached the kernel, so they need no CAP_NET_ADMIN;
and a restarted net role rebuilds the set from the sessions, so nobody who is
online loses access with it.

Every role can write the shared store (they all run as the user appliance), so a
session row alone opens nothing: the portal also writes a *grant* for it, an
HMAC-SHA256 over (session id, ip, mac) with `firewall-grant.key`, which only the
portal and the net role can read (the other units hide it, InaccessiblePaths=).
A role that forges or revives a session without that key gets no guest let in.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import sqlite3
from pathlib import Path

from appliance.net.setup import check_pair
from appliance.state import leases
from appliance.state.sessions import SessionStore

log = logging.getLogger("appliance.net.members")

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
KEY_FILE = "firewall-grant.key"


def grant_key(state_dir: Path) -> bytes:
    """The grant key (32 random bytes, mode 0600), made on first use."""
    path = Path(state_dir) / KEY_FILE
    try:
        key = path.read_bytes()
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process made it just now
            key = path.read_bytes()
        else:
            key = secrets.token_bytes(32)
            with os.fdopen(fd, "wb") as fh:
                fh.write(key)
    if len(key) < 16:
        raise ValueError(f"{path} is too short to be a grant key")
    return key


def signature(key: bytes, session_id: str, ip: str, mac: str) -> str:
    return hmac.new(key, f"{session_id} {ip} {mac}".encode(), hashlib.sha256).hexdigest()


def grant(conn: sqlite3.Connection, key: bytes, session_id: str, ip: str, mac: str) -> None:
    """What the portal writes after a login: the net role lets only granted sessions in."""
    conn.execute(
        "INSERT OR REPLACE INTO firewall_grants (session_id, signature) VALUES (?, ?)",
        (session_id, signature(key, session_id, ip, mac)),
    )


def create_schema(conn: sqlite3.Connection) -> None:
    """The sessions and leases tables too: the net role may start before the others."""
    conn.executescript(SCHEMA)
    SessionStore(conn)  # creates the session and lease tables when missing


def prune_grants(conn: sqlite3.Connection) -> None:
    """Grants of ended sessions go, so reviving an ended session row opens nothing."""
    conn.execute(
        "DELETE FROM firewall_grants WHERE session_id NOT IN "
        "(SELECT id FROM sessions WHERE ended IS NULL)"
    )


# An active, unexpired session on the binding it was made in (same MAC, no new grant
# of the address since: the rule of `SessionStore.lookup_ip`), with its grant.  Read
# here as one join: the net role runs it after every change to the store, so it must
# stay cheap with thousands of guests (SessionStore.list() parses every row's JSON).
_WANTED = f"""
SELECT s.id, s.ip, s.mac, MIN(s.idle_expiry, s.absolute_expiry, lease.expires), g.signature
FROM sessions AS s
{leases.binding_join("s", ":now")}
JOIN firewall_grants AS g ON g.session_id = s.id
WHERE s.ended IS NULL AND s.idle_expiry > :now AND s.absolute_expiry > :now
"""
_refused: set[str] = set()  # sessions whose bad grant was logged already
# rows already checked (address parsed, grant verified): most syncs change a few rows
_verified: dict[tuple[object, ...], Pair] = {}


def wanted(conn: sqlite3.Connection, now: float, key: bytes) -> tuple[set[Pair], float | None]:
    """The pairs that belong in `authenticated`, and when that next changes by the clock."""
    out: set[Pair] = set()
    due: float | None = None
    if len(_verified) > 100000:
        _verified.clear()
    for sid, ip, mac, ends, sig in conn.execute(_WANTED, {"now": now}).fetchall():
        known = _verified.get((key, sid, ip, mac, sig))
        if known is not None:
            out.add(known)
            due = float(ends) if due is None else min(due, float(ends))
            continue
        try:
            pair = check_pair(str(ip), str(mac))
        except ValueError:
            log.warning("ignoring a session with a bad address: %r %r", ip, mac)
            continue
        if not hmac.compare_digest(str(sig), signature(key, str(sid), *pair)):
            if sid not in _refused and len(_refused) < 10000:
                _refused.add(sid)
                log.warning("session %s at %s: its grant does not verify; not let in", sid[:8], ip)
            continue
        _verified[(key, sid, ip, mac, sig)] = pair
        out.add(pair)
        due = float(ends) if due is None else min(due, float(ends))
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
