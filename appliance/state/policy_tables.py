"""The policy tables that several appliances share, in the store: one row per table.

A row holds the table's text and its version (the SHA-256 prefix the admin pages use,
appliance/admin/files.py).  A write names the version it replaces, so two appliances
that both changed a table never overwrite each other unseen: the second write changes
nothing and its writer takes the store's text instead (appliance/admin/mirror.py).
This module is the only one that knows their SQL.
"""

from __future__ import annotations

from dataclasses import dataclass

from appliance.state.connection import Connection


@dataclass(frozen=True, slots=True)
class SharedTable:
    name: str  # the table's file name: servers.toml, access.toml, agents.toml
    text: str
    version: str
    updated: float
    by: str  # the appliance that wrote it


def read_all(conn: Connection) -> dict[str, SharedTable]:
    rows = conn.execute("SELECT name, text, version, updated, by FROM policy_tables").fetchall()
    return {str(n): SharedTable(str(n), str(t), str(v), float(u), str(b)) for n, t, v, u, b in rows}


def publish_group(
    conn: Connection, tables: list[SharedTable], expected: dict[str, str | None]
) -> bool:
    """Write `tables` together, only if every table of `expected` (those written and
    those checked with them, as servers and access are) is still at the version given
    (None: no row): a pair of tables is never mixed from two boxes' edits.  False
    when the store holds something else by now (nothing is written then)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        now = {t.name: t.version for t in read_all(conn).values()}
        if any(now.get(name) != version for name, version in expected.items()):
            conn.execute("ROLLBACK")
            return False
        for table in tables:
            if not publish(conn, table, expected.get(table.name)):
                raise RuntimeError(f"{table.name} changed under the write lock")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
    return True


def publish(conn: Connection, table: SharedTable, replaces: str | None) -> bool:
    """Write `table` over the store's row at version `replaces` (None: only if the store
    has no such table yet); False when the store holds something else by now."""
    if replaces is None:
        cur = conn.execute(
            "INSERT INTO policy_tables (name, text, version, updated, by) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT (name) DO NOTHING",
            (table.name, table.text, table.version, table.updated, table.by),
        )
    else:
        cur = conn.execute(
            "UPDATE policy_tables SET text = ?, version = ?, updated = ?, by = ? "
            "WHERE name = ? AND version = ?",
            (table.text, table.version, table.updated, table.by, table.name, replaces),
        )
    return bool(cur.rowcount > 0)


__all__ = ["SharedTable", "publish", "publish_group", "read_all"]
