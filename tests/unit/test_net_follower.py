"""The lease follower's batching, and what net/dns read from servers.toml."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from appliance.core.config import load
from appliance.net import follower, tables
from appliance.state import store
from dhcp import leases

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]
MAC1, MAC2 = "02:47:00:00:00:01", "02:47:00:00:00:02"


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
    leases.create_schema(conn)
    now = time.time()
    leases.record(conn, "granted", leases.Lease("192.168.1.100", MAC1, now + 60), now)
    leases.record(conn, "granted", leases.Lease("192.168.1.101", MAC2, now - 1), now)
    last = leases.record(conn, "released", leases.Lease("192.168.1.102", MAC2, now + 60), now)
    scripts: list[str] = []
    assert follower.full_sync(conn, now, scripts.append) == last
    assert scripts == [
        "flush set inet appliance leased\n"
        f"add element inet appliance leased {{ 192.168.1.100 . {MAC1} }}\n"
    ]


def test_tables_read_intercepts_and_guest_names(tmp_path: Path) -> None:
    text = (ROOT / "policies" / "appliance.toml").read_text()
    for name in ("servers", "access"):
        text = text.replace(f'"{name}.toml"', f'"{ROOT / "policies" / (name + ".toml")}"')
    (tmp_path / "a.toml").write_text(text)
    cfg = load(tmp_path / "a.toml")
    assert tables.intercepts(cfg) == {25: 2525, 110: 1110, 80: 8081}
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
    leases.create_schema(conn)
    now = time.time()
    leases.record(conn, "granted", leases.Lease("192.168.1.100", MAC1, now + 60), now)
    leases.record(
        conn, "granted", leases.Lease("192.168.1.105", "02:47:00:00:00:0b:00:00", now + 60), now
    )
    scripts: list[str] = []
    follower.full_sync(conn, now, scripts.append)
    assert scripts == [
        "flush set inet appliance leased\n"
        f"add element inet appliance leased {{ 192.168.1.100 . {MAC1} }}\n"
    ]
