"""Sessions: lifecycle, idle and absolute expiry, (IP, MAC) binding, lease following, restarts."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.state import leases, store
from appliance.state.leases import Lease
from appliance.state.sessions import SessionStore

pytestmark = pytest.mark.unit

IP, MAC = "192.168.1.100", "02:47:00:00:00:01"
IP2, MAC2 = "192.168.1.101", "02:47:00:00:00:02"


def make(tmp_path: Path, revoked: list[tuple[str, str]]) -> SessionStore:
    conn = store.connect(tmp_path / "state.sqlite")
    return SessionStore(
        conn, idle=600, maximum=3600, revoke=lambda ip, mac: revoked.append((ip, mac))
    )


def grant(st: SessionStore, ip: str, mac: str, now: float, expires: float = 10_000.0) -> None:
    leases.record(st.conn, "granted", Lease(ip, mac, expires), now)


def test_lifecycle_login_lookup_touch_end(tmp_path: Path) -> None:
    revoked: list[tuple[str, str]] = []
    st = make(tmp_path, revoked)
    grant(st, IP, MAC, 100)
    s = st.create(
        user="alice",
        source="site",
        attributes={"department": "Sales 1", "roles": ("a", "b")},
        ip=IP,
        mac=MAC.upper(),
        personal_servers={"pop3": "203.0.113.3:110"},
        now=100,
    )
    assert s.mac == MAC and s.idle_expiry == 700 and s.absolute_expiry == 3700
    got = st.lookup_ip(IP, now=200)
    assert got is not None and got.user == "alice" and got.attributes["roles"] == ("a", "b")
    assert got.personal_servers == {"pop3": "203.0.113.3:110"}
    assert st.get(s.id) == got and [x.id for x in st.list()] == [s.id]
    st.touch(s.id, now=650)
    assert st.lookup_ip(IP, now=1200) is not None  # touched: idle expiry moved to 1250
    assert st.end(s.id, "logged out", now=1300) is True
    assert revoked == [(IP, MAC)]
    assert st.lookup_ip(IP, now=1301) is None
    assert st.end(s.id, "again") is False and revoked == [(IP, MAC)]
    ended = st.get(s.id)
    assert ended is not None and ended.end_reason == "logged out" and st.list() == []
    assert len(st.list(include_ended=True)) == 1


def test_idle_and_absolute_expiry_end_and_revoke(tmp_path: Path) -> None:
    revoked: list[tuple[str, str]] = []
    st = make(tmp_path, revoked)
    grant(st, IP, MAC, 0)
    grant(st, IP2, MAC2, 0)
    idle = st.create(user="a", source="site", attributes={}, ip=IP, mac=MAC, now=0)
    busy = st.create(user="b", source="site", attributes={}, ip=IP2, mac=MAC2, now=0)
    assert st.lookup_ip(IP, now=600) is None  # idle expiry is exclusive
    for t in range(500, 3600, 500):
        st.touch(busy.id, now=t)
    assert st.sweep(now=601) == 1 and revoked == [(IP, MAC)]
    assert st.get(idle.id).end_reason == "idle too long"  # type: ignore[union-attr]
    # touching never pushes past the absolute limit
    st.touch(busy.id, now=3500)
    assert st.get(busy.id).idle_expiry == 3600  # type: ignore[union-attr]
    assert st.lookup_ip(IP2, now=3599) is not None
    assert st.sweep(now=3600) == 1
    assert st.get(busy.id).end_reason == "session time over"  # type: ignore[union-attr]


def test_next_expiry_is_the_soonest_idle_or_absolute_end(tmp_path: Path) -> None:
    st = make(tmp_path, [])
    assert st.next_expiry() is None
    grant(st, IP, MAC, 0)
    grant(st, IP2, MAC2, 0)
    a = st.create(user="a", source="site", attributes={}, ip=IP, mac=MAC, now=0)
    st.create(user="b", source="site", attributes={}, ip=IP2, mac=MAC2, now=100)
    assert st.next_expiry() == 600  # a's idle end
    st.touch(a.id, now=400)
    assert st.next_expiry() == 700  # now b's
    st.end(a.id, "logged out", now=450)
    assert st.next_expiry() == 700


def test_binding_needs_the_lease_with_the_same_mac(tmp_path: Path) -> None:
    revoked: list[tuple[str, str]] = []
    st = make(tmp_path, revoked)
    st.create(user="a", source="site", attributes={}, ip=IP, mac=MAC, now=0)
    assert st.lookup_ip(IP, now=1) is None  # no lease at all
    grant(st, IP, MAC2, 1)  # the address belongs to another device
    assert st.lookup_ip(IP, now=2) is None
    assert st.sweep(now=3) == 1 and revoked == [(IP, MAC)]


def test_lease_release_and_expiry_events_end_sessions(tmp_path: Path) -> None:
    revoked: list[tuple[str, str]] = []
    st = make(tmp_path, revoked)
    grant(st, IP, MAC, 0)
    grant(st, IP2, MAC2, 0)
    a = st.create(user="a", source="site", attributes={}, ip=IP, mac=MAC, now=1)
    b = st.create(user="b", source="site", attributes={}, ip=IP2, mac=MAC2, now=1)
    assert st.follow_leases(now=2) == 0
    leases.record(st.conn, "released", Lease(IP, MAC, 0), now=3)
    leases.record(st.conn, "expired", Lease(IP2, MAC2, 0), now=3)
    assert st.follow_leases(now=4) == 2
    assert st.get(a.id).end_reason == "lease released"  # type: ignore[union-attr]
    assert st.get(b.id).end_reason == "lease expired"  # type: ignore[union-attr]
    assert sorted(revoked) == [(IP, MAC), (IP2, MAC2)]


def test_a_new_login_replaces_the_old_session_of_the_device(tmp_path: Path) -> None:
    revoked: list[tuple[str, str]] = []
    st = make(tmp_path, revoked)
    grant(st, IP, MAC, 0)
    first = st.create(user="a", source="site", attributes={}, ip=IP, mac=MAC, now=1)
    second = st.create(user="b", source="site", attributes={}, ip=IP, mac=MAC, now=2)
    assert st.get(first.id).end_reason == "replaced by a new login"  # type: ignore[union-attr]
    assert st.lookup_ip(IP, now=3).id == second.id  # type: ignore[union-attr]


def test_sessions_and_the_lease_cursor_survive_a_restart(tmp_path: Path) -> None:
    revoked: list[tuple[str, str]] = []
    st = make(tmp_path, revoked)
    grant(st, IP, MAC, 0)
    s = st.create(
        user="a", source="agent:home.example", attributes={"x": "y"}, ip=IP, mac=MAC, now=1
    )
    st.follow_leases(now=2)
    st.conn.close()
    # the portal restarts; meanwhile the lease is released
    other = store.connect(tmp_path / "state.sqlite")
    leases.record(other, "released", Lease(IP, MAC, 0), now=5)
    st2 = make(tmp_path, revoked)
    assert st2.get(s.id) is not None and st2.get(s.id).active  # type: ignore[union-attr]
    assert st2.follow_leases(now=6) == 1 and revoked == [(IP, MAC)]
    assert st2.follow_leases(now=7) == 0  # the cursor was kept: no double end


def test_a_failing_firewall_revoke_still_ends_the_session(tmp_path: Path) -> None:
    def boom(ip: str, mac: str) -> None:
        raise RuntimeError("nft missing")

    st = SessionStore(store.connect(tmp_path / "s.sqlite"), revoke=boom)
    grant(st, IP, MAC, 0)
    s = st.create(user="a", source="site", attributes={}, ip=IP, mac=MAC, now=1)
    assert st.end(s.id, "test", now=2) is True
    assert st.lookup_ip(IP, now=3) is None


def test_a_session_does_not_survive_release_and_a_new_grant(tmp_path: Path) -> None:
    """Released and granted again before any follower ran: the old session is void at once."""
    st = make(tmp_path, [])
    grant(st, IP, MAC, 0)
    st.create(user="a", source="site", attributes={}, ip=IP, mac=MAC, now=1)
    leases.record(st.conn, "renewed", Lease(IP, MAC, 20_000.0), now=2)
    assert st.lookup_ip(IP, now=3) is not None  # a renewal keeps the binding
    leases.record(st.conn, "released", Lease(IP, MAC, 0), now=4)
    grant(st, IP, MAC, 5)
    assert st.lookup_ip(IP, now=6) is None


def test_a_late_follower_does_not_end_the_login_made_after_the_release(tmp_path: Path) -> None:
    revoked: list[tuple[str, str]] = []
    st = make(tmp_path, revoked)
    grant(st, IP, MAC, 0)
    old = st.create(user="a", source="site", attributes={}, ip=IP, mac=MAC, now=1)
    leases.record(st.conn, "released", Lease(IP, MAC, 0), now=2)
    grant(st, IP, MAC, 3)
    new = st.create(user="a", source="site", attributes={}, ip=IP, mac=MAC, now=4)
    assert st.get(old.id).ended is not None  # type: ignore[union-attr]  # replaced at login
    revoked.clear()
    assert st.follow_leases(now=5) == 0  # the follower reads the release only now
    assert st.lookup_ip(IP, now=6) == st.get(new.id)
    assert revoked == []  # and the new login keeps its firewall entry


@pytest.mark.parametrize("kind", sorted(leases.ENDING_KINDS))
def test_every_lease_kind_that_ends_a_binding_ends_its_session(tmp_path: Path, kind: str) -> None:
    revoked: list[tuple[str, str]] = []
    st = make(tmp_path, revoked)
    grant(st, IP, MAC, 0)
    sess = st.create(user="a", source="site", attributes={}, ip=IP, mac=MAC, now=1)
    leases.record(st.conn, kind, Lease(IP, MAC, 0), now=2)
    assert st.follow_leases(now=3) == 1 and revoked == [(IP, MAC)]
    ended = st.get(sess.id)
    assert ended is not None and ended.end_reason
