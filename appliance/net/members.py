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
from pathlib import Path

from appliance.net.setup import check_pair
from appliance.state import grants
from appliance.state.connection import Connection

log = logging.getLogger("appliance.net.members")

Pair = grants.Pair

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


def grant(conn: Connection, key: bytes, session_id: str, ip: str, mac: str) -> None:
    """What the portal writes after a login: the net role lets only granted sessions in."""
    grants.write_grant(conn, session_id, signature(key, session_id, ip, mac))


_refused: set[str] = set()  # sessions whose bad grant was logged already
# rows already checked (address parsed, grant verified): most syncs change a few rows
_verified: dict[tuple[object, ...], Pair] = {}


def wanted(conn: Connection, now: float, key: bytes) -> tuple[set[Pair], float | None]:
    """The pairs that belong in `authenticated`, and when that next changes by the clock."""
    out: set[Pair] = set()
    due: float | None = None
    if len(_verified) > 100000:
        _verified.clear()
    for sid, ip, mac, ends, sig in grants.granted_sessions(conn, now):
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
