"""The lease follower's batching, and what net/dns read from servers.toml."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from appliance.core.config import load
from appliance.net import follower, members, nft, tables
from appliance.state import grants, leases, schema, store
from appliance.state.sessions import Session, SessionStore

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]
MAC1, MAC2 = "02:47:00:00:00:01", "02:47:00:00:00:02"
KEY = bytes(range(32))


def ev(i: int, kind: str, ip: str, mac: str) -> leases.LeaseEvent:
    return leases.LeaseEvent(i, 0.0, kind, ip, mac)


def test_a_batch_is_one_transaction_and_the_last_event_of_a_pair_wins() -> None:
    scripts: list[str] = []
    follower.apply_events(
        [
            ev(1, "granted", "192.168.1.100", MAC1),
            ev(2, "released", "192.168.1.100", MAC1),
            ev(3, "granted", "192.168.1.101", MAC2.upper()),
            ev(4, "renewed", "192.168.1.102", MAC1),
            ev(5, "expired", "192.168.1.102", MAC1),
            ev(6, "granted", "not-an-ip", MAC1),  # ignored, logged
        ],
        scripts.append,
    )
    assert len(scripts) == 1
    lines = scripts[0].splitlines()
    assert f"add element inet appliance leased {{ 192.168.1.101 . {MAC2} }}" in lines
    # an ended lease leaves leased and authenticated (add first: delete is then safe)
    ended = f"192.168.1.100 . {MAC1}, 192.168.1.102 . {MAC1}"
    for name in ("leased", "authenticated"):
        add = lines.index(f"add element inet appliance {name} {{ {ended} }}")
        assert lines[add + 1] == f"delete element inet appliance {name} {{ {ended} }}"


def test_no_events_no_transaction() -> None:
    scripts: list[str] = []
    follower.apply_events([], scripts.append)
    assert scripts == []


def test_full_sync_loads_only_bound_unexpired_leases(tmp_path: Path) -> None:
    conn = store.connect(tmp_path / "s.sqlite")
    schema.upgrade(conn)
    now = time.time()
    leases.record(conn, "granted", leases.Lease("192.168.1.100", MAC1, now + 60), now)
    leases.record(conn, "granted", leases.Lease("192.168.1.101", MAC2, now - 1), now)
    last = leases.record(conn, "released", leases.Lease("192.168.1.102", MAC2, now + 60), now)
    schema.upgrade(conn)
    scripts: list[str] = []
    assert follower.full_sync(conn, now, scripts.append, KEY) == (last, set(), None)
    assert scripts == [
        "flush set inet appliance leased\nflush set inet appliance authenticated\n"
        f"add element inet appliance leased {{ 192.168.1.100 . {MAC1} }}\n"
    ]


def test_tables_read_intercepts_and_guest_names(tmp_path: Path) -> None:
    text = (ROOT / "policies" / "appliance.toml").read_text()
    for name in ("servers", "access"):
        text = text.replace(f'"{name}.toml"', f'"{ROOT / "policies" / (name + ".toml")}"')
    (tmp_path / "a.toml").write_text(text)
    cfg = load(tmp_path / "a.toml")
    assert tables.intercepts(cfg) == {
        **{25: 2525, 110: 1110, 80: 8081, 443: 1443, 587: 1587, 465: 1465},
        **{143: 1143, 993: 1993, 995: 1995},
    }
    assert set(tables.guest_names(cfg)) >= {"mail", "smtp", "pop", "proxy"}


def test_released_and_granted_again_in_one_batch_still_leaves_authenticated() -> None:
    """A guest that releases and at once gets the same address again must log in again."""
    scripts: list[str] = []
    follower.apply_events(
        [ev(1, "released", "192.168.1.100", MAC1), ev(2, "granted", "192.168.1.100", MAC1)],
        scripts.append,
    )
    lines = scripts[0].splitlines()
    pair = f"{{ 192.168.1.100 . {MAC1} }}"
    assert f"delete element inet appliance authenticated {pair}" in lines
    assert f"add element inet appliance leased {pair}" in lines
    assert f"delete element inet appliance leased {pair}" not in lines


def test_a_lease_with_a_bad_mac_is_skipped_not_fatal(tmp_path: Path) -> None:
    """One odd row must never stop the follower (whose stop would take the rules down)."""
    conn = store.connect(tmp_path / "s.sqlite")
    schema.upgrade(conn)
    now = time.time()
    leases.record(conn, "granted", leases.Lease("192.168.1.100", MAC1, now + 60), now)
    leases.record(
        conn, "granted", leases.Lease("192.168.1.105", "02:47:00:00:00:0b:00:00", now + 60), now
    )
    schema.upgrade(conn)
    scripts: list[str] = []
    follower.full_sync(conn, now, scripts.append, KEY)
    assert scripts == [
        "flush set inet appliance leased\nflush set inet appliance authenticated\n"
        f"add element inet appliance leased {{ 192.168.1.100 . {MAC1} }}\n"
    ]


class Granting(SessionStore):
    """A session store whose logins are granted, as the portal's authorize does."""

    def create(self, **kw: Any) -> Session:
        sess = super().create(**kw)
        members.grant(self.conn, KEY, sess.id, sess.ip, sess.mac)
        return sess


def _store(tmp_path: Path) -> tuple[sqlite3.Connection, SessionStore]:
    conn = store.connect(tmp_path / "s.sqlite")
    schema.upgrade(conn)
    return conn, Granting(conn, idle=600, maximum=3600)


def test_authenticated_is_the_sessions_whose_lease_still_binds_them(tmp_path: Path) -> None:
    """What a restarted net role puts back: active sessions on the binding they were made in."""
    conn, st = _store(tmp_path)
    now = time.time()
    ip = [f"192.168.1.{100 + i}" for i in range(5)]
    for i, mac in ((0, MAC1), (1, MAC2), (2, "02:47:00:00:00:03"), (3, "02:47:00:00:00:04")):
        leases.record(conn, "granted", leases.Lease(ip[i], mac, now + 120), now - 100)
    st.create(user="a", source="site", attributes={}, ip=ip[0], mac=MAC1.upper(), now=now - 50)
    b = st.create(user="b", source="site", attributes={}, ip=ip[1], mac=MAC2, now=now - 50)
    st.end(b.id, "logout", now=now - 10)  # ended: out
    c_mac = "02:47:00:00:00:05"  # not the MAC the lease of ip[2] binds
    st.create(user="c", source="site", attributes={}, ip=ip[2], mac=c_mac, now=now - 50)
    # a session made before the address was granted again (same MAC): out, must log in again
    old = st.create(user="d", source="site", attributes={}, ip=ip[3], mac="02:47:00:00:00:04",
                    now=now - 200)  # fmt: skip
    st.create(user="e", source="site", attributes={}, ip=ip[4], mac=MAC2, now=now - 50)  # no lease
    want, due = members.wanted(conn, now, KEY)
    assert want == {(ip[0], MAC1)}
    assert old.id and due is not None and abs(due - (now + 120)) < 1  # the lease ends first
    # the clock: once the idle time is over, nobody
    assert members.wanted(conn, now + 600, KEY)[0] == set()


def test_sync_changes_only_the_difference_and_writes_the_receipt(tmp_path: Path) -> None:
    conn, st = _store(tmp_path)
    now = time.time()
    leases.record(conn, "granted", leases.Lease("192.168.1.100", MAC1, now + 120), now - 100)
    st.create(user="a", source="site", attributes={}, ip="192.168.1.100", mac=MAC1, now=now)
    stale = ("192.168.1.101", MAC2)
    scripts: list[str] = []
    have, _ = follower.sync_authenticated(conn, now, {stale}, scripts.append, KEY)
    assert have == {("192.168.1.100", MAC1)}
    table = "inet appliance authenticated"
    assert scripts == [
        f"add element {table} {{ 192.168.1.101 . {MAC2} }}\n"
        f"delete element {table} {{ 192.168.1.101 . {MAC2} }}\n"
        f"add element {table} {{ 192.168.1.100 . {MAC1} }}\n"
    ]
    assert grants.confirmed(conn, "192.168.1.100", MAC1)
    assert not grants.confirmed(conn, *stale)
    follower.sync_authenticated(conn, now, have, scripts.append, KEY)
    assert len(scripts) == 1  # nothing changed: no transaction


def test_no_receipt_when_the_kernel_refuses(tmp_path: Path) -> None:
    """The receipt follows the kernel: a failed nft transaction confirms nothing."""
    conn, st = _store(tmp_path)
    now = time.time()
    leases.record(conn, "granted", leases.Lease("192.168.1.100", MAC1, now + 120), now - 100)
    st.create(user="a", source="site", attributes={}, ip="192.168.1.100", mac=MAC1, now=now)

    def refuse(script: str) -> None:
        raise nft.NftError("no table")

    with pytest.raises(nft.NftError):
        follower.sync_authenticated(conn, now, set(), refuse, KEY)
    assert not grants.confirmed(conn, "192.168.1.100", MAC1)


def test_a_session_without_a_valid_grant_is_not_let_in(tmp_path: Path) -> None:
    """Any role can write the store; only a grant signed with the key opens the firewall."""
    conn, st = _store(tmp_path)
    plain = SessionStore(conn)  # writes sessions, no grant: what a forging role could do
    now = time.time()
    macs = [f"02:47:00:00:00:{i:02x}" for i in range(1, 6)]
    for i, mac in enumerate(macs):
        leases.record(
            conn, "granted", leases.Lease(f"192.168.1.{100 + i}", mac, now + 120), now - 99
        )
    ok = st.create(user="a", source="site", attributes={}, ip="192.168.1.100", mac=macs[0], now=now)
    plain.create(user="b", source="site", attributes={}, ip="192.168.1.101", mac=macs[1], now=now)
    forged = plain.create(user="c", source="site", attributes={}, ip="192.168.1.102", mac=macs[2],
                          now=now)  # fmt: skip
    members.grant(conn, b"not the key, but long enough", forged.id, "192.168.1.102", macs[2])
    # a real grant copied onto another guest's session does not verify either
    other = plain.create(user="d", source="site", attributes={}, ip="192.168.1.103", mac=macs[3],
                         now=now)  # fmt: skip
    sig = conn.execute("SELECT signature FROM firewall_grants WHERE session_id = ?", (ok.id,))
    conn.execute("INSERT INTO firewall_grants VALUES (?, ?)", (other.id, sig.fetchone()[0]))
    assert members.wanted(conn, now, KEY)[0] == {("192.168.1.100", macs[0])}
    # an ended session's grant goes; reviving the row afterwards opens nothing
    st.end(ok.id, "logout", now=now)
    have, _ = follower.sync_authenticated(
        conn, now, {("192.168.1.100", macs[0])}, lambda s: None, KEY
    )
    assert have == set()
    conn.execute("UPDATE sessions SET ended = NULL, end_reason = NULL WHERE id = ?", (ok.id,))
    assert members.wanted(conn, now, KEY)[0] == set()


def test_the_grant_key_is_made_once_private_and_kept(tmp_path: Path) -> None:
    key = members.grant_key(tmp_path)
    assert len(key) == 32 and members.grant_key(tmp_path) == key
    assert (tmp_path / members.KEY_FILE).stat().st_mode & 0o777 == 0o600
    (tmp_path / members.KEY_FILE).write_bytes(b"")
    with pytest.raises(ValueError):
        members.grant_key(tmp_path)  # an empty key would let anyone sign: refused
