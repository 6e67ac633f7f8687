"""The store's versioned migrations: a fresh store, a store from before versioning, a
store newer than the code, and roles upgrading at the same moment."""

from __future__ import annotations

import multiprocessing
import sqlite3
from pathlib import Path

import pytest

from appliance.state import leases, schema, store
from appliance.state.sessions import SessionStore

pytestmark = pytest.mark.unit

NEWEST = schema.APPLIANCE.newest


def tables(conn: sqlite3.Connection) -> set[str]:
    return {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


def test_a_fresh_store_gets_every_table_and_the_newest_version(tmp_path: Path) -> None:
    conn = store.connect(tmp_path / "s.sqlite")
    assert schema.upgrade(conn) == NEWEST
    assert schema.version(conn) == NEWEST
    assert {"leases", "lease_events", "sessions", "session_events", "audit", "usage"} <= tables(
        conn
    )
    assert schema.upgrade(conn) == NEWEST  # again: nothing to do, nothing doubled
    rows = conn.execute("SELECT version FROM schema_version ORDER BY version").fetchall()
    assert [r[0] for r in rows] == [m.version for m in schema.APPLIANCE.migrations]


def test_a_store_from_before_versioning_is_taken_up_with_its_rows(tmp_path: Path) -> None:
    conn = store.connect(tmp_path / "old.sqlite")
    # the leases table as the first release made it, before bound_since, and the index
    # that followed ended sessions by time
    conn.executescript(
        "CREATE TABLE leases (ip TEXT PRIMARY KEY, mac TEXT NOT NULL, client_id BLOB,"
        " hostname TEXT, state TEXT NOT NULL, expires REAL NOT NULL, updated REAL NOT NULL);"
        "INSERT INTO leases VALUES ('192.168.1.100', '02:00:00:00:00:01', NULL, 'a',"
        " 'bound', 4000000000, 1);"
        'CREATE TABLE sessions (id TEXT PRIMARY KEY, "user" TEXT NOT NULL, source TEXT NOT NULL,'
        " attributes TEXT NOT NULL, personal_servers TEXT NOT NULL, ip TEXT NOT NULL,"
        " mac TEXT NOT NULL, created REAL NOT NULL, last_seen REAL NOT NULL,"
        " idle_expiry REAL NOT NULL, absolute_expiry REAL NOT NULL, ended REAL, end_reason TEXT);"
        "CREATE INDEX sessions_ended ON sessions(ended) WHERE ended IS NOT NULL;"
    )
    assert schema.upgrade(conn) == NEWEST
    lease = leases.lookup_ip(conn, "192.168.1.100", 2.0)
    assert lease is not None and lease.hostname == "a" and lease.bound_since == 0.0
    indexes = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='index'")}
    assert "sessions_ended" not in indexes
    st = SessionStore(conn)  # and the new tables work on it
    s = st.create(
        user="alice", source="site", attributes={}, ip="192.168.1.100", mac="02:00:00:00:00:01"
    )
    assert [e.kind for e in st.events_after(0)] == ["started"] and st.get(s.id) is not None


def test_a_store_newer_than_the_code_is_refused_and_left_alone(tmp_path: Path) -> None:
    conn = store.connect(tmp_path / "new.sqlite")
    schema.upgrade(conn)
    conn.execute("INSERT INTO schema_version (version) VALUES (?)", (NEWEST + 1,))
    before = tables(conn)
    later = schema.Schema(
        "schema_version",
        (
            *schema.APPLIANCE.migrations,
            schema.Migration(NEWEST + 2, "x", "CREATE TABLE x (a TEXT)"),
        ),
    )
    schema.upgrade(conn, later)  # a newer code goes on
    assert "x" in tables(conn)
    conn2 = store.connect(tmp_path / "new2.sqlite")
    schema.upgrade(conn2)
    conn2.execute("INSERT INTO schema_version (version) VALUES (?)", (NEWEST + 5,))
    with pytest.raises(schema.SchemaTooNew, match="newer than this appliance"):
        schema.upgrade(conn2, later)
    assert before <= tables(conn) and "x" not in tables(conn2)


def test_a_failing_migration_leaves_the_store_as_it_was(tmp_path: Path) -> None:
    conn = store.connect(tmp_path / "f.sqlite")
    schema.upgrade(conn)
    broken = schema.Schema(
        "schema_version",
        (
            *schema.APPLIANCE.migrations,
            schema.Migration(NEWEST + 1, "half", "CREATE TABLE half (a TEXT); NOT SQL AT ALL"),
        ),
    )
    with pytest.raises(sqlite3.Error):
        schema.upgrade(conn, broken)
    assert "half" not in tables(conn) and schema.version(conn) == NEWEST
    assert not conn.in_transaction


def _upgrade(path: str) -> int:
    return schema.upgrade(store.connect(path))


def test_roles_upgrading_at_once_upgrade_once(tmp_path: Path) -> None:
    path = str(tmp_path / "race.sqlite")
    with multiprocessing.get_context("fork").Pool(6) as pool:
        assert pool.map(_upgrade, [path] * 12) == [NEWEST] * 12
    conn = store.connect(path)
    rows = conn.execute("SELECT version FROM schema_version ORDER BY version").fetchall()
    assert [r[0] for r in rows] == [m.version for m in schema.APPLIANCE.migrations]


def test_the_appliance_and_the_home_relay_keep_their_own_versions_in_one_store(
    tmp_path: Path,
) -> None:
    conn = store.connect(tmp_path / "shared.sqlite")
    assert schema.upgrade(conn, schema.RELAY) == schema.RELAY.newest  # the relay first
    assert schema.upgrade(conn) == NEWEST  # the appliance still makes all of its tables
    assert {"households", "leases", "sessions", "audit"} <= tables(conn)
    assert schema.version(conn, schema.RELAY) == schema.RELAY.newest


def _upgrade_pg(dsn: str) -> int:
    from appliance.state import postgres

    return schema.upgrade(postgres.connect(dsn))


def test_roles_upgrading_a_new_postgresql_store_at_once_upgrade_it_once(pg_dsn: str) -> None:
    from appliance.state import postgres

    with multiprocessing.get_context("fork").Pool(6) as pool:
        assert pool.map(_upgrade_pg, [pg_dsn] * 12) == [NEWEST] * 12
    conn = postgres.connect(pg_dsn)
    rows = conn.execute("SELECT version FROM schema_version ORDER BY version").fetchall()
    assert [r[0] for r in rows] == [m.version for m in schema.APPLIANCE.migrations]
