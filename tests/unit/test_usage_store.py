"""Per-user accounting: the store's UPSERT batches and queries, and the relay's recorder."""

from __future__ import annotations

import asyncio
import csv
import io
import sqlite3
from pathlib import Path

import pytest

from appliance.proxy.accounting import UsageRecorder
from appliance.state import schema, store, usage
from appliance.state.usage import Entry

pytestmark = pytest.mark.unit
DAY1 = 1_780_000_000.0  # 2026-05-28 UTC
DAY2 = DAY1 + 86400


def conn_at(tmp_path: Path) -> sqlite3.Connection:
    conn = store.connect(tmp_path / "state.sqlite")
    schema.upgrade(conn)
    return conn


def test_batches_add_up_per_day_user_service_and_session(tmp_path: Path) -> None:
    conn = conn_at(tmp_path)
    d1 = usage.day_of(DAY1)
    usage.add(
        conn,
        [Entry(d1, "alice", "pop3", "s1", 2, 100, 5000), Entry(d1, "bob", "smtp", None, 1, 9, 1)],
    )
    usage.add(conn, [Entry(d1, "alice", "pop3", "s1", 1, 10, 500, 0)])  # a second worker
    usage.add(conn, [Entry(usage.day_of(DAY2), "alice", "pop3", "s2", 1, 1, 1)])
    rows = usage.by_user_service(conn, d1, d1)
    assert [(u.user, u.service, u.connections, u.bytes_up, u.bytes_down) for u in rows] == [
        ("alice", "pop3", 3, 110, 5500),
        ("bob", "smtp", 1, 9, 1),
    ]
    both = usage.by_user_service(conn, *usage.days_back(2, DAY2))
    assert both[0].connections == 4 and both[0].bytes == 5612
    assert usage.daily(conn, "alice", d1, usage.day_of(DAY2)) == [
        (d1, 110, 5500),
        (usage.day_of(DAY2), 1, 1),
    ]
    assert usage.bytes_today(conn, "alice", "pop3", d1) == 5610
    assert usage.bytes_today(conn, "carol", "pop3", d1) == 0
    assert [(u.connections, u.bytes_down) for u in usage.of_session(conn, "s1")] == [(3, 5500)]
    assert usage.of_session(conn, "none") == []


def test_smtp_messages_sum_per_user_service_session_and_in_the_csv(tmp_path: Path) -> None:
    conn = conn_at(tmp_path)
    d1, d2 = usage.day_of(DAY1), usage.day_of(DAY2)
    usage.add(conn, [Entry(d1, "alice", "smtp", "s1", 1, 500, 90, 2)])
    usage.add(conn, [Entry(d1, "alice", "smtp", "s1", 1, 300, 90, 1)])  # another worker
    usage.add(conn, [Entry(d2, "alice", "smtp", "s2", 1, 100, 90, 4)])
    usage.add(conn, [Entry(d1, "alice", "pop3", "s1", 1, 10, 900)])
    rows = usage.by_user_service(conn, d1, d1)
    assert [(u.service, u.messages) for u in rows] == [("pop3", 0), ("smtp", 3)]
    assert [u.messages for u in usage.by_user_service(conn, d1, d2) if u.service == "smtp"] == [7]
    assert [(u.service, u.messages) for u in usage.of_session(conn, "s1")] == [
        ("pop3", 0),
        ("smtp", 3),
    ]
    csv_smtp = [r for r in usage.csv_rows(conn, d1, d2) if r[2] == "smtp"]
    assert [(r[0], r[6]) for r in csv_smtp] == [(d1, 3), (d2, 4)]


def test_csv_rows_have_a_header_and_one_row_per_day_user_service(tmp_path: Path) -> None:
    conn = conn_at(tmp_path)
    d1 = usage.day_of(DAY1)
    usage.add(conn, [Entry(d1, 'a,b "q"', "http", None, 1, 2, 3, 0)])
    out = io.StringIO()
    csv.writer(out).writerows(usage.csv_rows(conn, d1, d1))
    assert list(csv.reader(io.StringIO(out.getvalue()))) == [
        list(usage.CSV_HEADER),
        [d1, 'a,b "q"', "http", "1", "2", "3", "0"],
    ]


def test_recorder_aggregates_in_memory_and_flushes_one_batch(tmp_path: Path) -> None:
    rec = UsageRecorder.at(tmp_path / "state.sqlite")
    for _ in range(1000):
        rec.record("alice", "http", "s1", 10, 100, when=DAY1)
    rec.record("alice", "http", "s1", 1, 1, when=DAY2)  # the day turns: a line of its own
    assert len(rec.pending) == 2
    asyncio.run(rec.stop())
    assert rec.pending == {} and rec.written == 2
    conn = conn_at(tmp_path)
    (u,) = usage.by_user_service(conn, usage.day_of(DAY1), usage.day_of(DAY1))
    assert (u.connections, u.bytes_up, u.bytes_down) == (1000, 10_000, 100_000)


def test_a_batch_the_store_refuses_is_kept_for_the_next_flush(tmp_path: Path) -> None:
    calls = {"n": 0}

    def flaky() -> sqlite3.Connection:
        calls["n"] += 1
        if calls["n"] == 1:
            raise sqlite3.OperationalError("database is locked")
        return conn_at(tmp_path)

    rec = UsageRecorder(flaky)
    rec.record("bob", "smtp", None, 5, 6, when=DAY1)

    async def twice() -> None:
        await rec.flush()  # fails: kept
        rec.record("bob", "smtp", None, 5, 6, when=DAY1)
        await rec.flush()

    asyncio.run(twice())
    assert rec.failed == 1
    (u,) = usage.by_user_service(conn_at(tmp_path), usage.day_of(DAY1), usage.day_of(DAY1))
    assert (u.connections, u.bytes_up) == (2, 10)
