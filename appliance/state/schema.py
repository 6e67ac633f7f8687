"""The shared store's tables, all in one place, as numbered migrations.

Every role that writes the store calls `upgrade(conn)` when it opens it (cheap once
the store is current: one read of `schema_version`).  The migrations run in order,
each in the transaction that records its number, and under the store's write lock,
so roles starting together upgrade it once.  A store newer than this code is refused:
a role never writes tables it does not know.

The DDL is written once, in SQLite's words; the PostgreSQL backend translates the
column types (appliance/state/postgres.py), and its opener adds a NOTIFY trigger to
each FOLLOWED table, the followers' wake-up.  Stores made before versioning began
(version 0, tables made with CREATE TABLE IF NOT EXISTS) are taken up by migration 1
as they are.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from appliance.state.connection import STORE_ERRORS, Connection, is_sqlite


@dataclass(frozen=True)
class Migration:
    version: int
    why: str
    sql: str = ""
    step: Callable[[Connection], None] | None = None  # for what SQL alone cannot say


class SchemaTooNew(Exception):
    """The store was upgraded by a newer version of the appliance than this one."""


_V1 = """
CREATE TABLE IF NOT EXISTS leases (
    ip TEXT PRIMARY KEY,
    mac TEXT NOT NULL,
    client_id BLOB,
    hostname TEXT,
    state TEXT NOT NULL,          -- bound | released | expired | declined
    expires REAL NOT NULL,        -- epoch seconds (for declined: end of quarantine)
    updated REAL NOT NULL,
    bound_since REAL NOT NULL DEFAULT 0  -- when this MAC's current binding began
);
CREATE INDEX IF NOT EXISTS leases_mac ON leases(mac);
CREATE TABLE IF NOT EXISTS lease_events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time REAL NOT NULL,
    kind TEXT NOT NULL,
    ip TEXT NOT NULL,
    mac TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY,
    "user" TEXT NOT NULL,
    source TEXT NOT NULL,            -- "site" or "agent:<agent id>" (user is then user@<id>)
    attributes TEXT NOT NULL,        -- JSON object
    personal_servers TEXT NOT NULL,  -- JSON object: service -> "host:port"
    ip TEXT NOT NULL,
    mac TEXT NOT NULL,
    created REAL NOT NULL,
    last_seen REAL NOT NULL,
    idle_expiry REAL NOT NULL,
    absolute_expiry REAL NOT NULL,
    ended REAL,                      -- NULL while active
    end_reason TEXT
);
CREATE INDEX IF NOT EXISTS sessions_active_ip ON sessions(ip) WHERE ended IS NULL;
CREATE TABLE IF NOT EXISTS session_cursor (
    name TEXT PRIMARY KEY,
    last_event_id INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS firewall_members (
    ip TEXT NOT NULL,
    mac TEXT NOT NULL,
    PRIMARY KEY (ip, mac)
);
CREATE TABLE IF NOT EXISTS firewall_grants (
    session_id TEXT PRIMARY KEY,
    signature TEXT NOT NULL          -- HMAC-SHA256(key, "id ip mac"), hex
);
CREATE TABLE IF NOT EXISTS usage (
    day TEXT NOT NULL,               -- UTC, YYYY-MM-DD
    "user" TEXT NOT NULL,
    service TEXT NOT NULL,
    connections INTEGER NOT NULL DEFAULT 0,
    bytes_up INTEGER NOT NULL DEFAULT 0,    -- guest to server
    bytes_down INTEGER NOT NULL DEFAULT 0,  -- server to guest
    messages INTEGER NOT NULL DEFAULT 0,    -- SMTP messages accepted (where counted)
    PRIMARY KEY (day, "user", service)
);
CREATE INDEX IF NOT EXISTS usage_user_day ON usage("user", day);
CREATE TABLE IF NOT EXISTS session_usage (
    session TEXT NOT NULL,           -- sessions.id
    service TEXT NOT NULL,
    "user" TEXT NOT NULL,
    connections INTEGER NOT NULL DEFAULT 0,
    bytes_up INTEGER NOT NULL DEFAULT 0,
    bytes_down INTEGER NOT NULL DEFAULT 0,
    messages INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (session, service)
);
CREATE TABLE IF NOT EXISTS admin_logins (
    id TEXT PRIMARY KEY,
    admin TEXT NOT NULL,
    expires REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS admin_logins_admin ON admin_logins (admin);
"""


def _bound_since(conn: Connection) -> None:
    """A SQLite store made before leases had bound_since (version 1 makes it with it)."""
    if not is_sqlite(conn):
        return
    columns = {row[1] for row in conn.execute("PRAGMA table_info(leases)")}
    if "bound_since" not in columns:
        conn.execute("ALTER TABLE leases ADD COLUMN bound_since REAL NOT NULL DEFAULT 0")


_V3 = """
-- one row per start and end of a session, written in the change's own transaction:
-- what the other roles follow (appliance/state/follow.py); pruned after an hour
CREATE TABLE IF NOT EXISTS session_events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time REAL NOT NULL,
    kind TEXT NOT NULL,              -- started | ended
    session_id TEXT NOT NULL,
    ip TEXT NOT NULL,
    mac TEXT NOT NULL
);
DROP INDEX IF EXISTS sessions_ended;  -- ends were followed by time before
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time REAL NOT NULL,
    admin TEXT NOT NULL,
    action TEXT NOT NULL,
    target TEXT NOT NULL,
    diff TEXT NOT NULL DEFAULT ''
);
"""


# Federated relays (docs/home-relay.md "Federation"): the relay that holds a household's
# agent link ('' for none); each change of it as an event (that relay took the link,
# or its link ended) that the other relays follow by id; each relay's peer URL and
# heartbeat.
_RELAY_V2 = """
ALTER TABLE households ADD COLUMN relay TEXT NOT NULL DEFAULT '';
CREATE TABLE IF NOT EXISTS household_events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    key TEXT NOT NULL,
    relay TEXT NOT NULL,
    linked INTEGER NOT NULL,
    at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS relays (
    name TEXT PRIMARY KEY,
    url TEXT NOT NULL,
    seen REAL NOT NULL
);
"""


# An active/standby pair's fencing token: the box that became active last bumps the
# epoch, and a lease write made under an older one is refused (appliance/state/leases.py).
_V4 = """
CREATE TABLE IF NOT EXISTS ha_epoch (
    name TEXT PRIMARY KEY,
    epoch INTEGER NOT NULL,
    holder TEXT NOT NULL
);
"""


# The policy tables of appliances that share them ([policies] shared): each table's
# text and version (appliance/state/policy_tables.py, appliance/admin/mirror.py).
_V5 = """
CREATE TABLE IF NOT EXISTS policy_tables (
    name TEXT PRIMARY KEY,
    text TEXT NOT NULL,
    version TEXT NOT NULL,
    updated REAL NOT NULL,
    by TEXT NOT NULL
);
"""


# Each appliance on the store and the guest subnet it serves (appliance/state/
# appliances.py): the admin pages say which box a session is on, and a box refuses a
# subnet another one (not its pair) serves from the same store.
_V6 = """
CREATE TABLE IF NOT EXISTS appliances (
    name TEXT PRIMARY KEY,
    guest_subnet TEXT NOT NULL,
    seen REAL NOT NULL
);
"""


@dataclass(frozen=True)
class Schema:
    """One store's migrations, and the table that records how far it got (the
    appliance's and the home relay's each their own, even in one PostgreSQL database)."""

    version_table: str
    migrations: tuple[Migration, ...]

    @property
    def newest(self) -> int:
        return self.migrations[-1].version


APPLIANCE = Schema(
    "schema_version",
    (
        Migration(1, "the tables of the first release", _V1),
        Migration(2, "leases.bound_since in stores older than it", step=_bound_since),
        Migration(3, "session events followed by id; the audit log in the store", _V3),
        Migration(4, "the DHCP epoch of an active/standby pair (leases.claim_epoch)", _V4),
        Migration(5, "policy tables shared by several appliances", _V5),
        Migration(6, "the appliances that share the store, and their guest subnets", _V6),
    ),
)
# the home relay's own store: who owns each household name (appliance/state/households.py)
RELAY = Schema(
    "relay_schema_version",
    (
        Migration(
            1,
            "household claims",
            "CREATE TABLE IF NOT EXISTS households (name TEXT PRIMARY KEY, key TEXT NOT NULL,"
            " claimed_at REAL NOT NULL, last_seen REAL NOT NULL)",
        ),
        Migration(2, "federated relays: who holds each household's link, announced", _RELAY_V2),
    ),
)
# the relay tables a federation's relays follow (PostgreSQL: the NOTIFY wake-up)
RELAY_FOLLOWED = ("household_events",)
# the tables whose changes wake the followers up (PostgreSQL: one NOTIFY trigger each)
FOLLOWED = ("leases", "lease_events", "sessions", "session_events", "firewall_grants")


def version(conn: Connection, schema: Schema = APPLIANCE) -> int:
    """The store's schema version (0: none recorded, a store older than versioning)."""
    row = conn.execute(f"SELECT MAX(version) FROM {schema.version_table}").fetchone()
    return int(row[0]) if row and row[0] is not None else 0


def upgrade(conn: Connection, schema: Schema = APPLIANCE) -> int:
    """Bring the store to the newest version this code knows; returns that version."""
    newest = schema.newest
    try:
        if version(conn, schema) == newest:  # the usual case: no write lock taken
            return newest
    except STORE_ERRORS:  # no version table yet: made below, under the lock
        if conn.in_transaction:  # (PostgreSQL: the failed statement's own)
            conn.execute("ROLLBACK")
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute(
            f"CREATE TABLE IF NOT EXISTS {schema.version_table} (version INTEGER NOT NULL)"
        )
        have = version(conn, schema)  # again, under the lock: another role may have done it
        if have > newest:
            raise SchemaTooNew(
                f"the store is at schema version {have}, newer than this appliance's "
                f"{newest}: upgrade the appliance (nothing was written)"
            )
        for m in schema.migrations:
            if m.version <= have:
                continue
            if m.sql:
                for statement in _statements(m.sql):
                    conn.execute(statement)
            if m.step is not None:
                m.step(conn)
            conn.execute(f"INSERT INTO {schema.version_table} (version) VALUES (?)", (m.version,))
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
    return newest


def _statements(sql: str) -> list[str]:
    """The statements of a migration, one by one (both backends run them in the open
    transaction; sqlite3's executescript would commit it first)."""
    lines = [line.split("--", 1)[0] for line in sql.splitlines()]
    return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]


__all__ = [
    "APPLIANCE",
    "FOLLOWED",
    "RELAY",
    "RELAY_FOLLOWED",
    "Migration",
    "Schema",
    "SchemaTooNew",
    "upgrade",
    "version",
]
