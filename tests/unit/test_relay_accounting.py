"""The relay accounts each finished connection per user and service, off the hot path."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from relay_helpers import (  # noqa: F401  (loop_kind: a fixture, used by every test)
    Echo,
    free_port,
    loop_kind,
    read_until,
    run,
    table,
)

from appliance.proxy.accounting import UsageRecorder
from appliance.proxy.gate import Listener, StaticGate
from appliance.proxy.relay import Relay
from appliance.state import store, usage

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("splice", [False, True])
def test_bytes_of_finished_connections_reach_the_store_per_user_and_service(
    tmp_path: Path, splice: bool
) -> None:
    db = tmp_path / "state.sqlite"

    async def body() -> None:
        loop = asyncio.get_running_loop()
        up_port = free_port()
        upstream = await loop.create_server(Echo, "127.0.0.1", up_port)
        port = free_port()
        gate = StaticGate(table(up_port, port, session="sess-1"))
        pop_port = free_port()  # (never port + 1: nothing holds that one for us)
        rec = UsageRecorder.at(db)
        relay = Relay(gate, connect_timeout=1.0, idle_timeout=5.0, splice=splice, usage=rec)
        await relay.start("127.0.0.1", (Listener("pop3", "pop3", pop_port),))
        for _ in range(3):
            r, w = await asyncio.open_connection("127.0.0.1", pop_port)
            assert await read_until(r, b"\n") == b"HELLO\n"
            w.write(b"abcd\n")
            assert await read_until(r, b"\n") == b"ABCD\n"
            w.write_eof()
            assert await read_until(r, b"BYE\n") == b"BYE\n"
            w.close()
        await asyncio.sleep(0.1)
        assert not relay.conns
        assert rec.written == 0 and len(rec.pending) == 1  # in memory until a flush
        await relay.stop()  # the stop flushes
        upstream.close()

    run(body())
    conn = store.connect(db)
    (u,) = usage.by_user_service(conn, *usage.days_back(1))
    assert (u.user, u.service, u.connections) == ("alice", "pop3", 3)
    assert (u.bytes_up, u.bytes_down) == (3 * 5, 3 * len(b"HELLO\nABCD\nBYE\n"))
    assert [s.connections for s in usage.of_session(conn, "sess-1")] == [3]


def test_refused_connections_are_not_accounted(tmp_path: Path) -> None:
    db = tmp_path / "state.sqlite"

    async def body() -> None:
        port = free_port()
        rec = UsageRecorder.at(db)
        relay = Relay(StaticGate(table(1, port, allow=["pop3"])), usage=rec)
        await relay.start("127.0.0.1", (Listener("smtp", "smtp", port),))
        r, w = await asyncio.open_connection("127.0.0.1", port)
        assert (await read_until(r, b"\n")).startswith(b"220")
        w.write(b"QUIT\r\n")
        await asyncio.wait_for(r.read(), 5)
        w.close()
        await asyncio.sleep(0.1)
        assert relay.counters[("smtp", "refused-denied")] == 1
        assert rec.pending == {}
        await relay.stop()

    run(body())


async def _mail_server(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    """Just enough of an SMTP server: "nobody" is no recipient, a body with REJECT is
    refused at its end, the rest is accepted."""
    w.write(b"220 mx ESMTP\r\n")
    while line := await r.readline():
        verb = line[:4].upper()
        if verb == b"DATA":
            w.write(b"354 go ahead\r\n")
            body = await r.readuntil(b"\r\n.\r\n")
            w.write(b"554 5.7.1 no\r\n" if b"REJECT" in body else b"250 2.0.0 queued\r\n")
        elif verb == b"RCPT" and b"nobody" in line:
            w.write(b"550 5.1.1 no such user\r\n")
        elif verb == b"QUIT":
            w.write(b"221 bye\r\n")
            break
        else:
            w.write(b"250 ok\r\n")
        await w.drain()
    w.close()


async def _send(r: asyncio.StreamReader, w: asyncio.StreamWriter, to: bytes, body: bytes) -> bytes:
    """One mail transaction, as a client that waits for each reply; the last reply."""
    for cmd in (b"MAIL FROM:<alice@x>", b"RCPT TO:<" + to + b">"):
        w.write(cmd + b"\r\n")
        reply = await read_until(r, b"\n")
    if not reply.startswith(b"250"):
        w.write(b"RSET\r\n")
        return await read_until(r, b"\n")
    w.write(b"DATA\r\n")
    assert (await read_until(r, b"\n")).startswith(b"354")
    w.write(body + b"\r\n.\r\n")
    return await read_until(r, b"\n")


@pytest.mark.parametrize("splice", [False, True])
def test_smtp_messages_the_server_accepted_are_counted(tmp_path: Path, splice: bool) -> None:
    db = tmp_path / "state.sqlite"

    async def body() -> None:
        up_port, port = free_port(), free_port()
        upstream = await asyncio.start_server(_mail_server, "127.0.0.1", up_port, limit=1 << 22)
        rec = UsageRecorder.at(db)
        relay = Relay(StaticGate(table(up_port, port)), splice=splice, usage=rec)
        await relay.start("127.0.0.1", (Listener("smtp", "smtp", port),))
        r, w = await asyncio.open_connection("127.0.0.1", port)
        assert (await read_until(r, b"\n")).startswith(b"220")
        big = b"Subject: big\r\n\r\n" + b"..dot-stuffed line of a big mail\r\n" * 20_000
        assert (await _send(r, w, b"bob@y", big)).startswith(b"250")  # > 64 KiB: copied
        assert (await _send(r, w, b"nobody@y", b"x")).startswith(b"250")  # (the RSET)
        assert (await _send(r, w, b"bob@y", b"REJECT me")).startswith(b"554")
        assert (await _send(r, w, b"bob@y", b"small")).startswith(b"250")
        w.write(b"QUIT\r\n")
        assert (await read_until(r, b"\n")).startswith(b"221")
        await asyncio.wait_for(r.read(), 5)
        w.close()
        await asyncio.sleep(0.1)
        assert relay.snapshot()["messages"] == {"smtp": 2}  # what Prometheus is shown
        await relay.stop()
        upstream.close()

    run(body())
    (u,) = usage.by_user_service(store.connect(db), *usage.days_back(1))
    assert (u.user, u.service, u.connections, u.messages) == ("alice", "smtp", 1, 2)
    assert u.bytes_up > 20_000 * 34
