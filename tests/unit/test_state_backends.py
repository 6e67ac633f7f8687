"""The state modules on both backends: the same calls give the same answers on SQLite
and on a real PostgreSQL (issue #18), through `store.open_store` as the roles open it."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.core.config import StateConfig
from appliance.state import audit, grants, leases, schema, store, usage
from appliance.state.admin_logins import AdminLogins
from appliance.state.connection import Connection
from appliance.state.follow import Cursor
from appliance.state.sessions import SessionStore

pytestmark = pytest.mark.unit
IP, MAC = "192.168.1.100", "02:47:00:00:00:01"
IP2, MAC2 = "192.168.1.101", "02:47:00:00:00:02"


@pytest.fixture(params=["sqlite", "postgresql"])
def state(request: pytest.FixtureRequest, tmp_path: Path) -> StateConfig:
    if request.param == "sqlite":
        return StateConfig(tmp_path)
    dsn = request.getfixturevalue("pg_dsn")
    return StateConfig(tmp_path, "postgresql", dsn)


@pytest.fixture
def conn(state: StateConfig) -> Iterator[Connection]:
    c = store.open_store(state)
    yield c
    c.close()


def test_the_schema_is_current_and_upgrading_again_changes_nothing(conn: Connection) -> None:
    newest = schema.APPLIANCE.newest
    assert schema.version(conn) == newest
    assert schema.upgrade(conn) == newest


def test_leases_and_their_events_in_commit_order(conn: Connection) -> None:
    now = time.time()
    last = leases.write_rows(
        conn,
        [
            ("granted", IP, MAC.upper(), b"\x01cid", "laptop", now + 600),
            ("granted", IP2, MAC2, None, None, now + 600),
        ],
        now,
    )
    got = leases.lookup_ip(conn, IP, now)
    assert got is not None and (got.mac, got.client_id, got.hostname) == (MAC, b"\x01cid", "laptop")
    assert got.bound_since == pytest.approx(now) and got.expires == pytest.approx(now + 600)
    assert leases.lookup_mac(conn, MAC2, now) is not None
    events = leases.events_since(conn, 0)
    assert [e.kind for e in events] == ["granted", "granted"] and events[-1].id == last
    leases.record(conn, "renewed", leases.Lease(IP, MAC, now + 1200), now + 10)
    renewed = leases.lookup_ip(conn, IP, now + 10)
    assert renewed is not None and renewed.bound_since == pytest.approx(now)  # kept
    leases.record(conn, "released", leases.Lease(IP2, MAC2, now), now + 20)
    assert leases.lookup_ip(conn, IP2, now + 20) is None
    snap_id, bound = leases.snapshot(conn, now + 30)
    assert [x.ip for x in bound] == [IP]
    assert snap_id == leases.events_since(conn, 0)[-1].id
    cursor = Cursor(lambda after, limit: leases.events_since(conn, after, limit), last)
    assert [e.kind for e in cursor.drain()] == ["renewed", "released"] and cursor.poll() == []


def test_sessions_their_events_and_the_lease_follower(conn: Connection) -> None:
    now = time.time()
    leases.write_rows(conn, [("granted", IP, MAC, None, None, now + 600)], now - 5)
    st = SessionStore(conn, idle=60.0, maximum=3600.0)
    start = st.last_event()
    s = st.create(
        user="alice@home.example",
        source="agent:home.example",
        attributes={"role": "staff", "groups": ("a", "b")},
        ip=IP,
        mac=MAC,
        personal_servers={"pop3": "192.0.2.1:110"},
        now=now,
        max_seconds=120.0,
    )
    found = st.lookup_ip(IP, now + 1)
    assert found is not None and found.id == s.id and found.user == "alice@home.example"
    assert found.attributes == {"role": "staff", "groups": ("a", "b")}
    assert found.absolute_expiry == pytest.approx(now + 120.0)  # the rule's session_max
    st.touch(s.id, now + 100)  # the idle expiry never passes the absolute one
    touched = st.get(s.id)
    assert touched is not None and touched.idle_expiry == pytest.approx(now + 120.0)
    assert st.next_expiry() == pytest.approx(now + 120.0)
    leases.record(conn, "released", leases.Lease(IP, MAC, now), now + 2)
    assert st.follow_leases(now + 3) == 1
    assert st.lookup_ip(IP, now + 3) is None
    ended = st.ended_after(start)
    assert [(e.session_id, e.ip) for e in ended] == [(s.id, IP)]
    assert [e.kind for e in st.events_after(start)] == ["started", "ended"]
    assert st.follow_leases(now + 4) == 0  # the cursor is kept in the store
    assert st.sweep(now + 7200) == 0  # old events pruned, nothing else to end


def test_grants_and_the_kernel_receipt(conn: Connection) -> None:
    now = time.time()
    leases.write_rows(conn, [("granted", IP, MAC, None, None, now + 600)], now - 5)
    st = SessionStore(conn)
    s = st.create(user="carol", source="site", attributes={}, ip=IP, mac=MAC, now=now)
    grants.write_grant(conn, s.id, "sig1")
    grants.write_grant(conn, s.id, "sig2")  # replaced, not doubled
    rows = grants.granted_sessions(conn, now + 1)
    assert [(r[0], r[1], r[2], r[4]) for r in rows] == [(s.id, IP, MAC, "sig2")]
    assert rows[0][3] == pytest.approx(min(s.idle_expiry, s.absolute_expiry, now + 600))
    grants.record(conn, {(IP, MAC)}, set())
    grants.record(conn, {(IP, MAC)}, set())  # already there: no error
    assert grants.confirmed(conn, IP, MAC)
    grants.record(conn, set(), {(IP, MAC)})
    assert not grants.confirmed(conn, IP, MAC)
    st.end(s.id, "logout")
    grants.prune_grants(conn)
    assert grants.granted_sessions(conn, now + 1) == []


def test_usage_sums_and_the_quota_view(conn: Connection) -> None:
    day = usage.day_of(time.time())
    batch = [
        usage.Entry(day, "alice", "smtp", "s1", 1, 100, 20, 1),
        usage.Entry(day, "alice", "smtp", "s1", 1, 50, 5, 2),
        usage.Entry(day, "bob", "http", "s2", 3, 10, 5000, 0),
    ]
    assert usage.add(conn, batch) == 3
    totals = {(u.user, u.service): u for u in usage.by_user_service(conn, day, day)}
    alice = totals[("alice", "smtp")]
    assert (alice.connections, alice.bytes_up, alice.bytes_down, alice.messages) == (2, 150, 25, 3)
    assert isinstance(alice.bytes_up, int)  # not a Decimal from PostgreSQL's SUM
    assert usage.bytes_today(conn, "bob", "http", day) == 5010
    assert usage.bytes_of_day(conn, day) == {("alice", "smtp"): 175, ("bob", "http"): 5010}
    assert [u.messages for u in usage.of_session(conn, "s1")] == [3]
    rows = list(usage.csv_rows(conn, day, day))
    assert rows[0] == usage.CSV_HEADER and len(rows) == 3


def test_admin_logins_and_the_audit_log(conn: Connection) -> None:
    logins = AdminLogins(conn)
    a = logins.start("alice", 60.0)
    b = logins.start("alice", 60.0)
    assert logins.live(a, "alice") and not logins.live(a, "bob")
    logins.end(a)
    assert not logins.live(a, "alice") and logins.live(b, "alice")
    assert logins.end_all("alice") == 1 and not logins.live(b, "alice")
    audit.append(conn, [audit.Entry(1.0, "alice", "edit", "access.toml", "-a\n+b\n")])
    audit.append(conn, [audit.Entry(2.0, "bob", "end session", "carol", "")])
    assert [(e.admin, e.diff) for e in audit.newest(conn)] == [("bob", ""), ("alice", "-a\n+b\n")]


def test_a_commit_elsewhere_is_seen_by_data_version(state: StateConfig) -> None:
    watcher, writer = store.open_store(state), store.open_store(state)
    try:
        before = store.data_version(watcher)
        leases.write_rows(writer, [("granted", IP, MAC, None, None, time.time() + 60)], time.time())
        deadline = time.monotonic() + 2
        while store.data_version(watcher) == before and time.monotonic() < deadline:
            time.sleep(0.01)
        assert store.data_version(watcher) != before
    finally:
        watcher.close()
        writer.close()
