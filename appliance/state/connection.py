"""What the state modules need of a connection to the store, whichever the backend.

The subset of `sqlite3.Connection` they use, in autocommit mode with explicit
`BEGIN IMMEDIATE` / `COMMIT` / `ROLLBACK`: SQLite's own connection has it, and the
PostgreSQL backend's adapter (appliance/state/postgres.py) offers the same, so the SQL
in this package is written once, in the subset both engines speak (qmark parameters,
`ON CONFLICT ... DO UPDATE`, `RETURNING`, the column "user" quoted).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Iterator
from typing import Any, Protocol

import psycopg


class Cursor(Protocol):
    @property
    def rowcount(self) -> int: ...
    def fetchone(self) -> Any: ...
    def fetchall(self) -> list[Any]: ...
    def __iter__(self) -> Iterator[Any]: ...


class Connection(Protocol):
    @property
    def in_transaction(self) -> bool: ...
    def execute(self, sql: str, parameters: Any = ..., /) -> Cursor: ...
    def executemany(self, sql: str, parameters: Iterable[Any], /) -> Cursor: ...
    def close(self) -> None: ...


def is_sqlite(conn: Connection) -> bool:
    return isinstance(conn, sqlite3.Connection)


__all__ = ["STORE_ERRORS", "Connection", "Cursor", "is_sqlite"]

# what a failing store raises, whichever the backend
STORE_ERRORS: tuple[type[Exception], ...] = (sqlite3.Error, psycopg.Error)
