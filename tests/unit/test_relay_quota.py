"""A rule's quota_bytes_per_day: once a user's bytes of today on a service reach it,
a new connection is refused in the protocol's words (the relay's accounting counts)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from relay_helpers import (  # noqa: F401  (loop_kind: a fixture, used by every test)
    PORTAL,
    Echo,
    free_port,
    loop_kind,
    read_until,
    run,
    table,
)

from appliance.admin import grid
from appliance.core.tomlfile import TomlFile
from appliance.policy.access_rights import parse_access
from appliance.proxy.accounting import UsageRecorder
from appliance.proxy.gate import Admission, Listener, Refusal, StaticGate, quota_spent
from appliance.proxy.refusals import RefusalDialog, http_refusal, imap_reply, tls_refusal
from appliance.proxy.relay import Relay
from appliance.state import schema, store, usage

pytestmark = pytest.mark.unit
SPENT = quota_spent(Admission("alice", "metered", ()))


def test_the_words_of_a_spent_quota_per_protocol() -> None:
    smtp = RefusalDialog("smtp", SPENT)
    assert smtp.greeting().startswith(b"220 ")  # greets: the client shows the reply to MAIL
    assert smtp.feed(b"EHLO me\r\n").startswith(b"250")
    assert smtp.feed(b"MAIL FROM:<a@b>\r\n") == (
        b"452 4.7.1 quota for today used up, try again tomorrow\r\n"
    )
    pop3 = RefusalDialog("pop3", SPENT)
    assert pop3.greeting().startswith(b"+OK")
    assert pop3.feed(b"USER alice\r\n") == (
        b"-ERR [SYS/TEMP] quota for today used up, try again tomorrow\r\n"
    )
    assert imap_reply(SPENT) == "* BYE [LIMIT] quota for today used up, try again tomorrow"
    status, page = http_refusal(SPENT, True)
    assert status == 429 and b"quota for today" in page
    assert tls_refusal(SPENT) == bytes((21, 3, 3, 0, 2, 2, 49))  # access_denied


def test_the_grid_keeps_a_quota_through_an_edit() -> None:
    text = '[[rules]]\nname = "m"\nallow = ["smtp"]\nquota_bytes_per_day = 5000\n'
    table_ = parse_access(TomlFile.parse(text, "access.toml"), ("smtp",))
    (row,) = grid.rows_of(table_)
    assert row.quota_bytes_per_day == "5000"
    again = parse_access(TomlFile.parse(grid.to_toml([row], ""), "access.toml"), ("smtp",))
    assert again.decide({}, "smtp").quota_bytes_per_day == 5000
    with pytest.raises(grid.GridError, match="quota_bytes_per_day"):
        grid.to_toml([grid.Row("m", "", {"smtp": "allow"}, quota_bytes_per_day="1G")], "")


@pytest.mark.parametrize("splice", [False, True])
def test_a_spent_quota_refuses_the_next_connection_in_protocol_words(
    tmp_path: Path, splice: bool
) -> None:
    db = tmp_path / "state.sqlite"
    conn = store.connect(db)
    schema.upgrade(conn)
    # earlier today, another worker counted 40 bytes of smtp for alice (in the store)
    usage.add(conn, [usage.Entry(usage.day_of(), "alice", "smtp", None, 1, 20, 20)])

    async def body() -> None:
        loop = asyncio.get_running_loop()
        up_port = free_port()
        upstream = await loop.create_server(Echo, "127.0.0.1", up_port)
        port = free_port()
        pop_port = free_port()  # (never port + 1: nothing holds that one for us)
        gate = StaticGate(table(up_port, port, quota_bytes_per_day=50))
        rec = UsageRecorder.at(db)
        relay = Relay(gate, connect_timeout=1.0, idle_timeout=5.0, splice=splice, usage=rec)
        await relay.start(
            "127.0.0.1", (Listener("smtp", "smtp", port), Listener("pop3", "pop3", pop_port))
        )
        await asyncio.sleep(0.2)  # the recorder's first read of today's totals
        assert rec.used_today("alice", "smtp") == 40
        # 40 < 50: admitted; moves 6 + 14 bytes
        r, w = await asyncio.open_connection("127.0.0.1", port)
        assert await read_until(r, b"\n") == b"HELLO\n"
        w.write(b"hello\n")
        assert await read_until(r, b"\n") == b"HELLO\n"
        w.write_eof()
        await asyncio.wait_for(r.read(), 5)
        w.close()
        await asyncio.sleep(0.1)
        assert rec.used_today("alice", "smtp") == 40 + 6 + 6 + 6 + 4  # up 6, down HELLO x2 BYE
        # 62 >= 50: the next one is refused, in SMTP's words
        r, w = await asyncio.open_connection("127.0.0.1", port)
        assert (await read_until(r, b"\n")).startswith(b"220 ")
        w.write(b"EHLO me\r\nMAIL FROM:<a@b>\r\n")
        assert await read_until(r, b"\n") == b"250 guest gateway\r\n"
        assert (await read_until(r, b"\n")).startswith(b"452 4.7.1 quota for today used up")
        w.close()
        # the quota is per service: POP3 of the same user still goes
        r, w = await asyncio.open_connection("127.0.0.1", pop_port)
        assert await read_until(r, b"\n") == b"HELLO\n"
        w.close()
        await asyncio.sleep(0.1)
        assert relay.counters[("smtp", "refused-quota")] == 1
        await relay.stop()
        upstream.close()

    run(body())
    (smtp,) = [u for u in usage.by_user_service(conn, *usage.days_back(1)) if u.service == "smtp"]
    assert smtp.connections == 2  # the refused one is not accounted


def test_without_accounting_a_quota_is_not_enforced(tmp_path: Path) -> None:
    async def body() -> None:
        port = free_port()
        relay = Relay(StaticGate(table(1, port, quota_bytes_per_day=1)))
        assert not relay.over_quota("alice", "smtp", 1)
        await relay.stop()

    run(body())


def test_refusal_kinds_are_words_not_addresses() -> None:
    assert "198.51.100" not in imap_reply(Refusal("quota", "x", PORTAL, "alice", "m"))


def test_a_spent_quota_answers_the_web_with_429(tmp_path: Path) -> None:
    from test_relay_core import HeadEcho, http_get

    db = tmp_path / "state.sqlite"
    conn = store.connect(db)
    schema.upgrade(conn)
    usage.add(conn, [usage.Entry(usage.day_of(), "alice", "http", None, 1, 500, 500)])

    async def body() -> None:
        loop = asyncio.get_running_loop()
        up_port = free_port()
        upstream = await loop.create_server(HeadEcho, "127.0.0.1", up_port)
        port = free_port()
        t = table(up_port, port, allow=["http"], quota_bytes_per_day=2000)
        t["servers"]["http"] = []
        rec = UsageRecorder.at(db)
        relay = Relay(StaticGate(t), usage=rec)
        await relay.start("127.0.0.1", (Listener("http", "http", port, explicit=True),))
        await asyncio.sleep(0.2)  # the recorder's first read of today's totals
        get = f"GET http://127.0.0.1:{up_port}/{'x' * 600} HTTP/1.1\r\nHost: x\r\n\r\n"
        assert (await http_get(port, get.encode())).startswith(b"HTTP/1.1 200")
        await asyncio.sleep(0.1)
        assert rec.used_today("alice", "http") >= 2000
        out = await http_get(port, get.encode())
        assert out.startswith(b"HTTP/1.1 429") and b"quota for today" in out, out[:200]
        await relay.stop()
        upstream.close()

    run(body())
