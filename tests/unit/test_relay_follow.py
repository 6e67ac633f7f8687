"""Ended sessions close their relayed connections: store query, follower, gate cache, relay."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
from test_proxy_gate import FakePolicy, config
from test_relay_core import Echo, free_port, read_until, run, table

from appliance.proxy.follow import EndedFollower
from appliance.proxy.gate import Admission, Listener, PolicyGate, Refusal, StaticGate
from appliance.proxy.relay import Relay
from appliance.state import leases, store
from appliance.state.sessions import SessionEvent, SessionStore

pytestmark = pytest.mark.unit
IP, MAC = "192.168.1.11", "02:47:00:00:00:01"
NEIGHBOURS = {IP: MAC}  # the kernel's neighbour table, as the gate reads it
IP2, MAC2 = "192.168.1.12", "02:47:00:00:00:02"


def sessions(tmp_path: Path) -> SessionStore:
    st = SessionStore(store.connect(tmp_path / "state.sqlite"))
    now = time.time()
    for ip, mac in ((IP, MAC), (IP2, MAC2)):
        leases.record(st.conn, "granted", leases.Lease(ip, mac, now + 3600), now - 1)
    return st


def test_store_session_events_follow_commit_order_not_clocks(tmp_path: Path) -> None:
    st = sessions(tmp_path)
    start = st.last_event()
    a = st.create(user="a", source="site", attributes={}, ip=IP, mac=MAC, now=time.time())
    b = st.create(user="b", source="site", attributes={}, ip=IP2, mac=MAC2, now=time.time())
    assert st.ended_after(start, 100) == []
    assert [e.kind for e in st.events_after(start, 100)] == ["started", "started"]
    st.end(b.id, "admin", now=2000.0)
    st.end(a.id, "logout", now=1000.0)  # an earlier clock, committed later
    ended = st.ended_after(start, 100)
    assert [(e.session_id, e.ip, e.time) for e in ended] == [
        (b.id, IP2, 2000.0),
        (a.id, IP, 1000.0),
    ]
    assert st.ended_after(ended[0].id, 100) == ended[1:]
    assert st.ended_after(st.last_event(), 100) == []
    assert not st.end(a.id, "again")  # ending an ended session writes no event
    assert st.ended_after(ended[-1].id, 100) == []


def test_session_events_are_pruned_after_an_hour(tmp_path: Path) -> None:
    st = sessions(tmp_path)
    now = time.time()
    a = st.create(user="a", source="site", attributes={}, ip=IP, mac=MAC, now=now - 7200)
    st.end(a.id, "logout", now=now - 7100)
    st.create(user="b", source="site", attributes={}, ip=IP2, mac=MAC2, now=now)
    st.sweep(now)
    assert [e.session_id for e in st.events_after(0, 100)] != [] and all(
        e.time >= now - 3600 for e in st.events_after(0, 100)
    )


def test_follower_reports_each_end_once_in_commit_order() -> None:
    rows: list[SessionEvent] = []
    got: list[list[str]] = []
    f = EndedFollower(
        lambda last, limit: [e for e in rows if e.id > last][:limit],
        0,
        lambda new: got.append([e.session_id for e in new]),
    )
    assert f.poll() == 0
    rows.append(SessionEvent(1, 101.0, "ended", "s1", IP, MAC))
    assert f.poll() == 1 and f.poll() == 0
    rows.append(SessionEvent(2, 99.0, "ended", "s2", IP2, MAC2))  # stamped earlier, later id
    assert f.poll() == 1
    assert got == [["s1"], ["s2"]]


def test_policy_gate_cache_drops_an_ended_session_at_once(tmp_path: Path) -> None:
    st = sessions(tmp_path)
    s = st.create(user="alice", source="site", attributes={"department": "Sales 1"}, ip=IP, mac=MAC)
    gate = PolicyGate(config(), FakePolicy({"Sales 1": {"smtp"}}), st, neighbour=NEIGHBOURS.get)
    gate.CACHE_TTL = 60.0
    a = gate.admit(IP, "smtp")
    assert isinstance(a, Admission) and a.session == s.id
    last = gate.last_session_event()
    st.end(s.id, "logout")
    # without the follower the cache would still admit for CACHE_TTL; ended_after drops it
    assert [e.session_id for e in gate.ended_after(last, 100)] == [s.id]
    r = gate.admit(IP, "smtp")
    assert isinstance(r, Refusal) and r.kind == "login"


def test_relay_closes_the_connections_of_an_ended_session_and_only_those() -> None:
    async def body() -> None:
        loop = asyncio.get_running_loop()
        up_port = free_port()
        upstream = await loop.create_server(Echo, "127.0.0.1", up_port)
        port = free_port()
        t = table(up_port, port, session="s-alice")
        t["users"]["127.0.0.2"] = {**t["users"]["127.0.0.1"], "user": "bob", "session": "s-bob"}
        gate = StaticGate(t)
        relay = Relay(gate, connect_timeout=1.0, idle_timeout=30.0, follow_period=0.05)
        await relay.start("127.0.0.1", (Listener("pop3", "pop3", port),))
        ra, wa = await asyncio.open_connection("127.0.0.1", port)
        rb, wb = await asyncio.open_connection("127.0.0.1", port, local_addr=("127.0.0.2", 0))
        for r in (ra, rb):
            assert await read_until(r, b"\n") == b"HELLO\n"
        assert {c.session for c in relay.conns} == {"s-alice", "s-bob"}
        t0 = loop.time()
        gate.ended.append(("s-alice", "127.0.0.1", time.time()))
        assert await asyncio.wait_for(ra.read(), 2) == b""  # closed by the relay
        took = loop.time() - t0
        assert took < 1.0, took
        wb.write(b"still here\n")
        assert await read_until(rb, b"\n") == b"STILL HERE\n"
        await asyncio.sleep(0.1)
        assert relay.counters[("pop3", "session-ended")] == 1
        assert [c.session for c in relay.conns] == ["s-bob"]
        for w in (wa, wb):
            w.close()
        await relay.stop()
        upstream.close()

    run(body())


def test_relay_survives_a_failing_store() -> None:
    async def body() -> None:
        calls: list[int] = []

        def broken(last: int, limit: int) -> Any:
            calls.append(last)
            raise OSError("database is locked")

        gate = StaticGate(table(1, free_port()))
        gate.ended_after = broken  # type: ignore[method-assign]
        relay = Relay(gate, follow_period=0.02)
        await relay.start("127.0.0.1", ())
        await asyncio.sleep(0.1)
        assert len(calls) >= 2  # still polling after the errors
        await relay.stop()

    run(body())


def test_policy_gate_asks_the_store_once_per_ttl_and_again_after_a_reload(tmp_path: Path) -> None:
    st = sessions(tmp_path)
    st.create(user="alice", source="site", attributes={"department": "Sales 1"}, ip=IP, mac=MAC)
    lookups: list[str] = []
    real = st.lookup_ip

    def counted(ip: str, now: float | None = None) -> Any:
        lookups.append(ip)
        return real(ip, now)

    st.lookup_ip = counted  # type: ignore[method-assign]
    policy = FakePolicy({"Sales 1": {"smtp"}})
    gate = PolicyGate(config(), policy, st, neighbour=NEIGHBOURS.get)
    answers = [gate.admit(IP, "smtp") for _ in range(100)]
    assert all(isinstance(a, Admission) for a in answers) and lookups == [IP]
    policy.allow = {}
    policy.reload()  # a table change: cached answers are dropped at once
    r = gate.admit(IP, "smtp")
    assert isinstance(r, Refusal) and r.kind == "denied" and lookups == [IP, IP]
