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
