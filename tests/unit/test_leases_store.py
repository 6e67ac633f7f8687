"""The lease table other roles read: lookups see only bound, unexpired leases; events follow."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.state import leases, schema, store
from appliance.state.leases import Lease

pytestmark = pytest.mark.unit


def test_lookups_and_events(tmp_path: Path) -> None:
    conn = store.connect(tmp_path / "state.sqlite")
    schema.upgrade(conn)
    lease = Lease("192.168.1.100", "02:47:00:00:00:01", expires=1000.0)
    first = leases.record(conn, "granted", lease, now=100.0)
    bound = Lease("192.168.1.100", "02:47:00:00:00:01", expires=1000.0, bound_since=100.0)
    assert leases.lookup_ip(conn, "192.168.1.100", now=500.0) == bound
    assert leases.lookup_mac(conn, "02:47:00:00:00:01", now=500.0) == bound
    assert leases.lookup_ip(conn, "192.168.1.100", now=1000.0) is None  # expired
    leases.record(conn, "released", lease, now=200.0)
    assert leases.lookup_ip(conn, "192.168.1.100", now=300.0) is None
    # another process (a second connection) follows the events by id
    other = store.connect(tmp_path / "state.sqlite", readonly=True)
    events = leases.events_since(other, first - 1)
    assert [(e.kind, e.ip) for e in events] == [
        ("granted", "192.168.1.100"),
        ("released", "192.168.1.100"),
    ]
    assert leases.events_since(other, events[-1].id) == []
    with pytest.raises(ValueError):
        leases.record(conn, "stolen", lease, now=1.0)
    assert len(leases.events_since(other, 0)) == 2  # the refused change wrote nothing


def test_a_binding_keeps_its_start_on_renewal_and_restarts_after_release(tmp_path: Path) -> None:
    conn = store.connect(tmp_path / "state.sqlite")
    schema.upgrade(conn)
    ip, mac = "192.168.1.100", "02:47:00:00:00:01"
    leases.record(conn, "granted", Lease(ip, mac, expires=2000.0), now=100.0)
    leases.record(conn, "renewed", Lease(ip, mac, expires=3000.0), now=200.0)
    lease = leases.lookup_ip(conn, ip, now=250.0)
    assert lease is not None and lease.bound_since == 100.0 and lease.expires == 3000.0
    leases.record(conn, "released", Lease(ip, mac, expires=300.0), now=300.0)
    leases.record(conn, "granted", Lease(ip, mac, expires=4000.0), now=301.0)
    lease = leases.lookup_ip(conn, ip, now=350.0)
    assert lease is not None and lease.bound_since == 301.0
    leases.record(conn, "granted", Lease(ip, "02:47:00:00:00:02", expires=5000.0), now=400.0)
    lease = leases.lookup_ip(conn, ip, now=450.0)
    assert lease is not None and lease.bound_since == 400.0  # another MAC: a new binding


def test_a_snapshot_is_the_bound_leases_and_the_last_event_they_cover(tmp_path: Path) -> None:
    conn = store.connect(tmp_path / "state.sqlite")
    schema.upgrade(conn)
    assert leases.snapshot(conn, now=0.0) == (0, [])
    kept = Lease("192.168.1.100", "02:47:00:00:00:01", expires=1000.0)
    leases.record(conn, "granted", kept, now=1.0)
    leases.record(conn, "granted", Lease("192.168.1.101", "02:47:00:00:00:02", 50.0), now=1.0)
    gone = Lease("192.168.1.102", "02:47:00:00:00:03", expires=1000.0)
    leases.record(conn, "granted", gone, now=1.0)
    last = leases.record(conn, "released", gone, now=2.0)
    bound = Lease("192.168.1.100", "02:47:00:00:00:01", expires=1000.0, bound_since=1.0)
    assert leases.snapshot(conn, now=100.0) == (last, [bound])  # not expired, not released
    assert leases.events_since(conn, last) == []  # following from its id misses nothing


def test_the_lease_kinds_are_one_list_split_into_binding_and_ending() -> None:
    assert {"granted", "renewed"} == leases.BINDING_KINDS
    assert {"released", "expired", "declined"} == leases.ENDING_KINDS
    assert leases.BINDING_KINDS | leases.ENDING_KINDS == leases.EVENT_KINDS
