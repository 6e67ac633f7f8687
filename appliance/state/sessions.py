"""Sessions: who is behind a guest address, stored in the shared state store.

A session is created by the portal after a login and is bound to the guest's
(IP, MAC) pair from its DHCP lease.  Every other role (proxy, DNS, firewall)
trusts it, so it ends as soon as that binding no longer holds: the lease is
released or expires, another MAC takes the address, the guest is idle too long,
or the absolute limit passes.  Every end revokes the firewall entry through the
`revoke` callable, so the (IP, MAC) pair loses its network access with it.

All state lives in SQLite (the file the leases of appliance/state/leases.py use), so
sessions survive a restart of any role or of the box while their lease is valid.  The SQL is kept
in this module only, so another store (PostgreSQL) can replace it later.
"""

from __future__ import annotations

import builtins
import contextlib
import json
import logging
import secrets
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING

from appliance.core.attributes import Attributes, as_json
from appliance.state import leases, schema
from appliance.state.connection import Connection
from appliance.state.follow import Cursor

if TYPE_CHECKING:
    from appliance.core.config import Config

log = logging.getLogger("appliance.state.sessions")

Revoke = Callable[[str, str], None]

EVENT_KEEP = 3600.0  # seconds a session event is kept: followers start from the newest

_COLUMNS = (
    'id, "user", source, attributes, personal_servers, ip, mac, created, last_seen, '
    "idle_expiry, absolute_expiry, ended, end_reason"
)

# why a session ends with each lease kind that ends its binding (leases.ENDING_KINDS)
END_REASONS: Mapping[str, str] = {
    "released": "lease released",
    "expired": "lease expired",
    "declined": "declined",
}


@dataclass(frozen=True)
class Session:
    id: str
    user: str
    source: str
    attributes: Attributes
    personal_servers: Mapping[str, str]
    ip: str
    mac: str
    created: float
    last_seen: float
    idle_expiry: float
    absolute_expiry: float
    ended: float | None = None
    end_reason: str | None = None

    @property
    def active(self) -> bool:
        return self.ended is None

    def expires(self) -> float:
        """When the session ends if nothing else happens (idle or absolute, the sooner)."""
        return min(self.idle_expiry, self.absolute_expiry)

    def seconds_remaining(self, now: float) -> int:
        return max(0, int(self.expires() - now))


@dataclass(frozen=True)
class SessionEvent:
    id: int
    time: float
    kind: str  # "started" or "ended"
    session_id: str
    ip: str
    mac: str


def _row(row: tuple[object, ...]) -> Session:
    attrs = {
        k: tuple(v) if isinstance(v, list) else str(v) for k, v in json.loads(str(row[3])).items()
    }
    return Session(
        id=str(row[0]),
        user=str(row[1]),
        source=str(row[2]),
        attributes=attrs,
        personal_servers={str(k): str(v) for k, v in json.loads(str(row[4])).items()},
        ip=str(row[5]),
        mac=str(row[6]),
        created=float(row[7]),  # type: ignore[arg-type]
        last_seen=float(row[8]),  # type: ignore[arg-type]
        idle_expiry=float(row[9]),  # type: ignore[arg-type]
        absolute_expiry=float(row[10]),  # type: ignore[arg-type]
        ended=None if row[11] is None else float(row[11]),  # type: ignore[arg-type]
        end_reason=None if row[12] is None else str(row[12]),
    )


def _no_revoke(ip: str, mac: str) -> None:
    log.debug("no firewall attached to this session store: nothing to revoke for %s", ip)


@dataclass
class SessionStore:
    """Sessions in the shared store; `revoke(ip, mac)` is called on every end."""

    conn: Connection
    idle: float = 1800.0
    maximum: float = 86400.0
    revoke: Revoke = field(default=_no_revoke)

    def __post_init__(self) -> None:
        schema.upgrade(self.conn)

    @classmethod
    def from_config(
        cls, config: Config, conn: Connection | None = None, *, revoke: Revoke
    ) -> SessionStore:
        """The store a role uses, its limits from [portal].  `revoke` takes an ended
        session's (IP, MAC) out of the firewall (`appliance.net.firewall.revoker`); a
        role that only reads passes `read_only`.  No default: forgetting it would end
        sessions that stay open in nftables."""
        from appliance.state import store

        return cls(
            conn or store.open_store(config.state),
            idle=float(config.portal.session_idle),
            maximum=float(config.portal.session_max),
            revoke=revoke,
        )

    # -- reading ----------------------------------------------------------------
    def lookup_ip(self, ip: str, now: float | None = None) -> Session | None:
        """The active, unexpired session of a guest address whose lease still binds it."""
        now = time.time() if now is None else now
        row = self.conn.execute(
            f"SELECT {_COLUMNS} FROM sessions WHERE ip = ? AND ended IS NULL "
            "AND idle_expiry > ? AND absolute_expiry > ? ORDER BY created DESC LIMIT 1",
            (ip, now, now),
        ).fetchone()
        if row is None:
            return None
        sess = _row(row)
        lease = leases.lookup_ip(self.conn, ip, now)
        # the session belongs to the binding it was made in: after a release or
        # expiry and a new grant (even to the same MAC) the guest logs in again
        if lease is None or lease.mac != sess.mac or lease.bound_since > sess.created:
            return None
        return sess

    def lease(self, ip: str, now: float | None = None) -> leases.Lease | None:
        """The bound, unexpired lease of a guest address (whichever session it has)."""
        return leases.lookup_ip(self.conn, ip, time.time() if now is None else now)

    def list(self, include_ended: bool = False) -> builtins.list[Session]:
        where = "" if include_ended else " WHERE ended IS NULL"
        rows = self.conn.execute(f"SELECT {_COLUMNS} FROM sessions{where} ORDER BY created")
        return [_row(r) for r in rows.fetchall()]

    def get(self, session_id: str) -> Session | None:
        row = self.conn.execute(
            f"SELECT {_COLUMNS} FROM sessions WHERE id = ?", (session_id,)
        ).fetchone()
        return _row(row) if row else None

    def events_after(
        self, last_id: int, limit: int = 1000, kind: str | None = None
    ) -> builtins.list[SessionEvent]:
        """Session events after `last_id` (only those of `kind`, if given), oldest first:
        what a `follow.Cursor` reads."""
        rows = self.conn.execute(
            "SELECT id, time, kind, session_id, ip, mac FROM session_events "
            f"WHERE id > ? {'' if kind is None else 'AND kind = ?'} ORDER BY id LIMIT ?",
            (last_id, limit) if kind is None else (last_id, kind, limit),
        ).fetchall()
        return [
            SessionEvent(int(i), float(t), str(k), str(sid), str(ip), str(mac))
            for i, t, k, sid, ip, mac in rows
        ]

    def ended_after(self, last_id: int, limit: int = 1000) -> builtins.list[SessionEvent]:
        """The ends of sessions after `last_id` (what the proxy and the DNS role follow)."""
        return self.events_after(last_id, limit, kind="ended")

    def last_event(self) -> int:
        """The newest session event's id (0: none): where a new follower starts."""
        row = self.conn.execute("SELECT COALESCE(MAX(id), 0) FROM session_events").fetchone()
        return int(row[0])

    # -- writing ----------------------------------------------------------------
    def create(
        self,
        *,
        user: str,
        source: str,
        attributes: Attributes,
        ip: str,
        mac: str,
        personal_servers: Mapping[str, str] | None = None,
        now: float | None = None,
        max_seconds: float | None = None,
    ) -> Session:
        """Start a session for (ip, mac); an earlier session on that ip or mac ends first.
        It lasts at most `max_seconds` (the deciding rule's session_max) and never longer
        than the portal's session_max."""
        now = time.time() if now is None else now
        mac = mac.lower()
        for old in self._active_where("ip = ? OR mac = ?", (ip, mac)):
            self.end(old.id, "replaced by a new login", now=now)
        sess = Session(
            # hex: an id never starts with "-", which argparse would take for an option
            id=secrets.token_hex(16),
            user=user,
            source=source,
            attributes=dict(attributes),
            personal_servers=dict(personal_servers or {}),
            ip=ip,
            mac=mac,
            created=now,
            last_seen=now,
            idle_expiry=now + self.idle,
            absolute_expiry=now + min(self.maximum, max_seconds or self.maximum),
        )
        with self._transaction():
            self._insert(sess)
        log.info("session %s started: user %s (%s) at %s %s", sess.id[:8], user, source, ip, mac)
        return sess

    def _insert(self, sess: Session) -> None:
        self.conn.execute(
            f"INSERT INTO sessions ({_COLUMNS}) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, NULL, NULL)",
            (
                sess.id,
                sess.user,
                sess.source,
                json.dumps(as_json(sess.attributes), sort_keys=True),
                json.dumps(dict(sess.personal_servers), sort_keys=True),
                sess.ip,
                sess.mac,
                sess.created,
                sess.last_seen,
                sess.idle_expiry,
                sess.absolute_expiry,
            ),
        )
        self._event(sess.created, "started", sess.id, sess.ip, sess.mac)

    def _event(self, now: float, kind: str, session_id: str, ip: str, mac: str) -> None:
        self.conn.execute(
            "INSERT INTO session_events (time, kind, session_id, ip, mac) VALUES (?, ?, ?, ?, ?)",
            (now, kind, session_id, ip, mac),
        )

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        """One transaction (BEGIN IMMEDIATE: the write lock, so event ids commit in
        order) for a change and its event row.  Inside a caller's transaction (none
        does so today) that one holds them, and it must be a BEGIN IMMEDIATE too."""
        if self.conn.in_transaction:
            yield
            return
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    def touch(self, session_id: str, now: float | None = None) -> None:
        """The guest was seen: push the idle expiry (never past the absolute one)."""
        now = time.time() if now is None else now
        self.conn.execute(
            "UPDATE sessions SET last_seen = ?, idle_expiry = CASE WHEN ? < absolute_expiry "
            "THEN ? ELSE absolute_expiry END WHERE id = ? AND ended IS NULL",
            (now, now + self.idle, now + self.idle, session_id),
        )

    def end(self, session_id: str, reason: str, now: float | None = None) -> bool:
        """End an active session and revoke its firewall entry; False when not active."""
        now = time.time() if now is None else now
        with self._transaction():
            cur = self.conn.execute(
                "UPDATE sessions SET ended = ?, end_reason = ? WHERE id = ? AND ended IS NULL "
                'RETURNING ip, mac, "user"',
                (now, reason, session_id),
            )
            row = cur.fetchone()
            cur.fetchall()
            if row is None:
                return False
            ip, mac, user = str(row[0]), str(row[1]), str(row[2])
            self._event(now, "ended", session_id, ip, mac)
        log.info("session %s ended: user %s at %s: %s", session_id[:8], user, ip, reason)
        # Recorded first, revoked second: a failing firewall never keeps a session alive.
        try:
            self.revoke(ip, mac)
        except Exception:
            log.exception("firewall revoke for %s %s failed", ip, mac)
        return True

    def _active_where(self, where: str, args: tuple[object, ...]) -> builtins.list[Session]:
        rows = self.conn.execute(
            f"SELECT {_COLUMNS} FROM sessions WHERE ended IS NULL AND ({where})", args
        ).fetchall()
        return [_row(r) for r in rows]

    # -- following the leases and the clock ---------------------------------------
    def follow_leases(self, now: float | None = None) -> int:
        """End sessions whose lease was released, expired or declined; returns how many.

        The last lease event seen is kept in the store, so a restarted follower
        resumes where it stopped and never misses a release.
        """
        now = time.time() if now is None else now
        row = self.conn.execute(
            "SELECT last_event_id FROM session_cursor WHERE name = 'portal'"
        ).fetchone()
        cursor = Cursor(partial(leases.events_since, self.conn), int(row[0]) if row else 0)
        ended = 0
        for ev in cursor.drain():
            # only sessions made before the event: a guest that released, got its
            # address again and logged in anew before we got here keeps the new one
            if ev.kind in leases.ENDING_KINDS:
                why = END_REASONS[ev.kind]
                matches = self._active_where(
                    "ip = ? AND mac = ? AND created <= ?", (ev.ip, ev.mac, ev.time)
                )
            elif ev.kind == "granted":
                why = "address given to another device"
                matches = self._active_where(
                    "ip = ? AND mac != ? AND created <= ?", (ev.ip, ev.mac, ev.time)
                )
            else:
                continue
            for sess in matches:
                ended += self.end(sess.id, why, now=now)
        self.conn.execute(
            "INSERT INTO session_cursor (name, last_event_id) VALUES ('portal', ?) "
            "ON CONFLICT(name) DO UPDATE SET last_event_id = excluded.last_event_id",
            (cursor.last,),
        )
        return ended

    def sweep(self, now: float | None = None) -> int:
        """End sessions past their idle or absolute expiry, or without a bound lease;
        session events older than EVENT_KEEP go."""
        now = time.time() if now is None else now
        self.conn.execute("DELETE FROM session_events WHERE time < ?", (now - EVENT_KEEP,))
        ended = 0
        for sess in self.list():
            if sess.absolute_expiry <= now:
                ended += self.end(sess.id, "session time over", now=now)
            elif sess.idle_expiry <= now:
                ended += self.end(sess.id, "idle too long", now=now)
            elif (lease := leases.lookup_ip(self.conn, sess.ip, now)) is None:
                ended += self.end(sess.id, "no bound lease", now=now)
            elif lease.mac != sess.mac:
                ended += self.end(sess.id, "lease belongs to another device", now=now)
        return ended

    def next_expiry(self) -> float | None:
        """When the next active session runs out (idle or absolute), if any."""
        row = self.conn.execute(
            "SELECT MIN(CASE WHEN idle_expiry < absolute_expiry THEN idle_expiry "
            "ELSE absolute_expiry END) FROM sessions WHERE ended IS NULL"
        ).fetchone()
        return float(row[0]) if row and row[0] is not None else None

    def maintain(self, now: float | None = None) -> int:
        """One round of the follower: lease events first, then the clock."""
        return self.follow_leases(now) + self.sweep(now)


def active_sources(conn: Connection) -> builtins.list[str]:
    """The login source of every active session ("site", or the agent's name): one
    column, for the portal's gauge, without parsing every row."""
    rows = conn.execute("SELECT source FROM sessions WHERE ended IS NULL").fetchall()
    return [str(r[0]) for r in rows]


def read_only(ip: str, mac: str) -> None:
    """The revoke of a store that only reads sessions (the relay): it must end none."""
    raise RuntimeError(f"a read-only session store cannot end the session of {ip} {mac}")


__all__ = [
    "Revoke",
    "Session",
    "SessionEvent",
    "SessionStore",
    "active_sources",
    "read_only",
]
