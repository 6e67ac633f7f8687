"""The lease table in the shared state store, and the lease events other roles follow.

The DHCP server (`dhcp/`) is the only writer.  Every change to a lease and its event
row are committed in one transaction before the reply leaves, so a crash never loses
an ACKed lease and followers (sessions, the net role's firewall sets) never miss a
change.  Readers in other processes (portal, net, proxy) use `lookup_ip`, `lookup_mac`,
`events_since` and `snapshot`.  This module is the only one that knows the lease SQL;
it lives in appliance/state, not in dhcp/, so that `dhcp` depends on `appliance` and
never the other way round.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from appliance.state.connection import Connection

# The one list of lease event kinds, with the state each leaves the lease row in.
STATE_AFTER: Mapping[str, str] = MappingProxyType(
    {
        "granted": "bound",
        "renewed": "bound",
        "released": "released",
        "expired": "expired",
        "declined": "declined",
    }
)
EVENT_KINDS = frozenset(STATE_AFTER)
# kinds after which the (ip, mac) pair holds the address ...
BINDING_KINDS = frozenset(k for k, state in STATE_AFTER.items() if state == "bound")
# ... and kinds that end the binding (and every session made on it)
ENDING_KINDS = EVENT_KINDS - BINDING_KINDS


@dataclass(frozen=True)
class Lease:
    ip: str
    mac: str
    expires: float
    state: str = "bound"
    client_id: bytes | None = None
    hostname: str | None = None
    bound_since: float = 0.0  # start of the current binding: renewals keep it, a new grant resets


@dataclass(frozen=True)
class LeaseEvent:
    id: int
    time: float
    kind: str
    ip: str
    mac: str


# the columns of a Lease, in its field order
_SELECT = "SELECT ip, mac, expires, state, client_id, hostname, bound_since FROM leases"
_HOLDS = "state = 'bound' AND expires > ?"  # a lease that binds its address at time ?


def _lease(
    row: tuple[str, str, float, str, bytes | None, str | None, float] | None,
) -> Lease | None:
    return Lease(*row) if row else None


def lookup_ip(conn: Connection, ip: str, now: float) -> Lease | None:
    """The bound, unexpired lease of an address, or None."""
    row = conn.execute(
        f"{_SELECT} WHERE ip = ? AND {_HOLDS}",
        (ip, now),
    ).fetchone()
    return _lease(row)


def lookup_mac(conn: Connection, mac: str, now: float) -> Lease | None:
    """The bound, unexpired lease of a MAC address, or None."""
    row = conn.execute(
        f"{_SELECT} WHERE mac = ? AND {_HOLDS} ORDER BY expires DESC LIMIT 1",
        (mac.lower(), now),
    ).fetchone()
    return _lease(row)


def record(conn: Connection, kind: str, lease: Lease, now: float) -> int:
    """Write one lease change and its event in a single transaction; returns the event id."""
    if kind not in STATE_AFTER:
        raise ValueError(f"unknown lease event kind {kind!r}")
    return write_rows(
        conn, [(kind, lease.ip, lease.mac, lease.client_id, lease.hostname, lease.expires)], now
    )


def events_since(conn: Connection, last_id: int, limit: int = 1000) -> list[LeaseEvent]:
    """Lease events after `last_id`, oldest first: followers keep the last id they saw."""
    rows = conn.execute(
        "SELECT id, time, kind, ip, mac FROM lease_events WHERE id > ? ORDER BY id LIMIT ?",
        (last_id, limit),
    ).fetchall()
    return [LeaseEvent(*r) for r in rows]


def all_leases(conn: Connection) -> list[Lease]:
    rows = conn.execute(f"{_SELECT} ORDER BY ip").fetchall()
    return [Lease(*r) for r in rows]


def snapshot(conn: Connection, now: float) -> tuple[int, list[Lease]]:
    """The last event id and the bound, unexpired leases, read in one transaction so the
    two agree: a follower that loads this and then follows `events_since(id)` misses no
    change and sees none twice."""
    conn.execute("BEGIN")
    try:
        row = conn.execute("SELECT COALESCE(MAX(id), 0) FROM lease_events").fetchone()
        rows = conn.execute(
            f"{_SELECT} WHERE {_HOLDS} ORDER BY ip",
            (now,),
        ).fetchall()
    finally:
        conn.execute("COMMIT")
    return int(row[0]), [Lease(*r) for r in rows]


def binding_join(session: str, now: str) -> str:
    """SQL: `JOIN leases AS lease ...` keeping a session row (alias `session`) only while
    its lease binds it: bound, unexpired at the parameter `now`, the same MAC, and not
    granted anew since the session was made (the rule `SessionStore.lookup_ip` applies
    to one address).  For a query over many sessions at once (the net role's set of
    who is let in); `lease.expires` is there for the caller to select."""
    return (
        f"JOIN leases AS lease ON lease.ip = {session}.ip AND lease.state = 'bound' "
        f"AND lease.expires > {now} AND lease.mac = lower({session}.mac) "
        f"AND lease.bound_since <= {session}.created"
    )


# A binding that goes on (a renewal: bound before and after, same MAC) keeps its start;
# anything else (first grant, a grant after release or expiry, another MAC) starts anew,
# so a session made before that moment no longer matches the lease.
_UPSERT = (
    "INSERT INTO leases (ip, mac, client_id, hostname, state, expires, updated, bound_since) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(ip) DO UPDATE SET "
    "bound_since = CASE WHEN leases.state = 'bound' AND excluded.state = 'bound' "
    "AND leases.mac = excluded.mac THEN leases.bound_since ELSE excluded.updated END, "
    "mac = excluded.mac, client_id = excluded.client_id, hostname = excluded.hostname, "
    "state = excluded.state, expires = excluded.expires, updated = excluded.updated"
)


def record_many(conn: Connection, changes: list[tuple[str, Lease]], now: float) -> None:
    """Write several lease changes and their events in one transaction (the server's
    group commit: one WAL write for a burst of ACKs, all durable before any reply)."""
    write_rows(
        conn, [(k, x.ip, x.mac, x.client_id, x.hostname, x.expires) for k, x in changes], now
    )


Row = tuple[str, str, str, bytes | None, str | None, float]  # kind, ip, mac, client id, name, end


class Superseded(Exception):
    """The other box of a pair became active after this one: this box's epoch is old,
    and nothing it would write from its index may land."""


def claim_epoch(conn: Connection, holder: str) -> int:
    """Become the pair's writer: bump the epoch (under the write lock) and return it.
    Every fenced write after this by a box with an older epoch is refused, so a box
    that lost the guest address while it waited for the lock writes nothing."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        row = conn.execute("SELECT epoch FROM ha_epoch WHERE name = 'dhcp'").fetchone()
        epoch = (int(row[0]) if row else 0) + 1
        conn.execute(
            "INSERT INTO ha_epoch (name, epoch, holder) VALUES ('dhcp', ?, ?) "
            "ON CONFLICT (name) DO UPDATE SET epoch = excluded.epoch, holder = excluded.holder",
            (epoch, holder),
        )
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
    return epoch


def _conflicts(conn: Connection, rows: list[Row], now: float) -> set[str]:
    """The addresses of `rows` that would overwrite another box's live lease: a grant
    or renewal of an address bound to another MAC; an end of a binding that another
    MAC holds; an expiry of a binding that is still live in the store (renewed by the
    other box)."""
    if not rows:
        return set()
    ips = {row[1] for row in rows}
    marks = ", ".join("?" * len(ips))
    held = dict(
        conn.execute(
            f"SELECT ip, mac FROM leases WHERE {_HOLDS} AND ip IN ({marks})", (now, *ips)
        ).fetchall()
    )
    out: set[str] = set()
    for kind, ip, mac, *_ in rows:  # in batch order: a release lets a later grant through
        holder = held.get(ip)
        if holder is not None and (kind == "expired" or holder != mac.lower()):
            out.add(ip)
        elif kind in BINDING_KINDS:
            held[ip] = mac.lower()
        else:
            held.pop(ip, None)
    return out


def write_rows(conn: Connection, rows: list[Row], now: float) -> int:
    """record_many without Lease objects: the server's hot path; returns the last event id."""
    if not rows:
        return 0
    conn.execute("BEGIN IMMEDIATE")
    try:
        last = _write(conn, rows, now)
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
    return last


def write_fenced(conn: Connection, rows: list[Row], now: float, epoch: int) -> set[str]:
    """write_rows for a box of a pair: under the write lock, first check that `epoch` is
    still the pair's (else Superseded, nothing written), then write every row but those
    that would overwrite another box's live lease (`_conflicts`); returns the addresses
    of the rows left out, whose replies must not leave."""
    if not rows:
        return set()
    conn.execute("BEGIN IMMEDIATE")
    try:
        row = conn.execute("SELECT epoch FROM ha_epoch WHERE name = 'dhcp'").fetchone()
        if row is None or int(row[0]) != epoch:
            raise Superseded(f"the pair's epoch is {row[0] if row else 0}, this box's {epoch}")
        refused = _conflicts(conn, rows, now)
        kept = [r for r in rows if r[1] not in refused]
        if kept:
            _write(conn, kept, now)
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
    return refused


def _write(conn: Connection, rows: list[Row], now: float) -> int:
    for row in rows:
        if row[0] not in STATE_AFTER:
            raise ValueError(f"unknown lease event kind {row[0]!r}")
    conn.executemany(
        _UPSERT,
        [
            (ip, mac.lower(), cid, name, STATE_AFTER[kind], end, now, now)
            for kind, ip, mac, cid, name, end in rows
        ],
    )
    conn.executemany(
        "INSERT INTO lease_events (time, kind, ip, mac) VALUES (?, ?, ?, ?)",
        [(now, kind, ip, mac.lower()) for kind, ip, mac, _, _, _ in rows],
    )
    return int(conn.execute("SELECT MAX(id) FROM lease_events").fetchone()[0])  # (locked)


def history(conn: Connection) -> list[Lease]:
    """Every lease row, the least recently changed first (how the server rebuilds its index)."""
    rows = conn.execute(f"{_SELECT} ORDER BY updated, ip").fetchall()
    return [Lease(*r) for r in rows]
