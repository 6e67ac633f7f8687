"""Opening the shared state store that every role of the appliance uses.

SQLite by default: one file in WAL mode, so the DHCP writer and the readers (portal,
proxy, DNS) work at once; synchronous=NORMAL in WAL mode keeps every committed
transaction across a crash or kill -9 of the process (not across a power cut before
the next checkpoint).  Or PostgreSQL (`[state] backend = "postgresql"`), through the
adapter in appliance/state/postgres.py.  The tables are in appliance/state/schema.py;
the modules beside this one hold all the SQL.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path

from appliance.core.config import StateConfig
from appliance.state import schema
from appliance.state.connection import Connection


def open_store(
    state: StateConfig,
    *,
    readonly: bool = False,
    tables: schema.Schema = schema.APPLIANCE,
    followed: Sequence[str] = schema.FOLLOWED,
) -> Connection:
    """The store as `[state]` configures it, upgraded to the current schema (unless
    `readonly`): the one door every role goes through (the home relay's claims too,
    with their own `tables`)."""
    if state.backend == "postgresql":
        from appliance.state import postgres

        pg = postgres.connect(state.dsn)
        if not readonly:
            schema.upgrade(pg, tables)
            if followed:
                postgres.install_notify(pg, followed)
        return pg
    conn = connect(state.database, readonly=readonly)
    if not readonly:
        schema.upgrade(conn, tables)
    return conn


def connect(path: str | Path, *, readonly: bool = False) -> sqlite3.Connection:
    """Open the store; the directory is created when missing."""
    path = Path(path)
    if not readonly:
        path.parent.mkdir(parents=True, exist_ok=True)
    uri = f"file:{path}?mode=ro" if readonly else f"file:{path}"
    conn = sqlite3.connect(
        uri, uri=True, timeout=5.0, isolation_level=None, check_same_thread=False
    )
    conn.execute("PRAGMA busy_timeout = 5000")
    if not readonly:
        _wal(conn)
        _same_owner(path)
    conn.execute("PRAGMA synchronous = NORMAL")
    return conn


def _same_owner(path: Path) -> None:
    """Root's CLI (`appliance admins`, `appliance sessions end`) writing a store the roles
    made: SQLite may create the -wal and -shm files now, as root, and the roles' own user
    could then no longer open the store.  They are given to the store file's owner."""
    if os.geteuid() != 0:
        return
    owner = path.stat()
    for side in (path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        try:
            st = side.stat()
            if (st.st_uid, st.st_gid) != (owner.st_uid, owner.st_gid):
                os.chown(side, owner.st_uid, owner.st_gid)
        except FileNotFoundError:
            continue


def _wal(conn: sqlite3.Connection) -> None:
    """WAL mode, persistent in the file.  Switching takes an exclusive lock that SQLite
    does not wait for (no busy handler): roles opening the store at the same moment
    (the proxy's forked workers) would fail with "database is locked", so an already-WAL
    file is left as it is and a switch that meets a lock is tried again briefly."""
    for attempt in range(50):
        mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
        if str(mode).lower() == "wal":
            return
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError:
            if attempt == 49:
                raise
            time.sleep(0.05)


def data_version(conn: Connection) -> int:
    """A number that changes when another connection commits to the store: a cheap read
    that tells a follower whether there is anything new to look at (PostgreSQL: the
    count of NOTIFY wake-ups received, appliance/state/postgres.py)."""
    if isinstance(conn, sqlite3.Connection):
        return int(conn.execute("PRAGMA data_version").fetchone()[0])
    from appliance.state import postgres

    assert isinstance(conn, postgres.PgConnection)
    return conn.data_version()
