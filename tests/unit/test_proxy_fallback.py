"""The fallback rule (proxy/fallback.py): upstreams in order, every failure logged and
counted with its reason, and the "no upstream" refusal, with what agents said, when none
answered; and both relay paths following it the same way."""

from __future__ import annotations

import asyncio
import logging

import pytest
from relay_helpers import Echo, free_port, loop_kind, read_until, run, table  # noqa: F401

from appliance.proxy.fallback import Fallback
from appliance.proxy.gate import NO_UPSTREAM, Listener, StaticGate, Upstream
from appliance.proxy.refusals import pop3_reply, smtp_reply
from appliance.proxy.relay import Relay
from appliance.proxy.tracked import UPSTREAM_FAILURES

pytestmark = pytest.mark.unit

A = Upstream("smtp/a", "192.0.2.1", 25)
B = Upstream("smtp/b", "192.0.2.2", 25)
HOME = Upstream("smtp/home", "", 0, agent="alice@alice-home.relay.example#pin")


def failures(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if " failed: " in r.getMessage()]


def test_the_upstreams_come_in_the_tables_order_then_none() -> None:
    tries = Fallback("smtp", (A, B))
    tries.add(HOME)  # (an upstream resolved from its name: after the others)
    assert [tries.next(), tries.next(), tries.next()] == [A, B, HOME]
    assert tries.next() is None
    assert tries.next() is None  # spent stays spent


def test_each_failure_is_logged_by_name_with_its_reason_and_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    before = UPSTREAM_FAILURES["smtp"]
    tries = Fallback("smtp", (A, B))
    with caplog.at_level(logging.WARNING, "appliance.proxy"):
        tries.failed(A, "Connection refused")
        tries.failed(B, "connect timed out")
    assert failures(caplog) == [
        "smtp upstream smtp/a failed: Connection refused",
        "smtp upstream smtp/b failed: connect timed out",
    ]
    assert not any("192.0.2." in line for line in failures(caplog))  # names, not addresses
    assert UPSTREAM_FAILURES["smtp"] == before + 2


def test_when_all_failed_the_guest_hears_no_upstream_in_its_protocols_words() -> None:
    tries = Fallback("smtp", (A,))
    assert tries.next() == A
    tries.failed(A, "Connection refused")
    assert tries.next() is None
    r = tries.refusal("alice", "staff")
    assert (r.kind, r.reason, r.user, r.rule) == ("unavailable", NO_UPSTREAM, "alice", "staff")
    assert r.reason == "no upstream reachable"
    assert smtp_reply(r).startswith("421 4.3.0")
    assert pop3_reply(r).startswith("-ERR [SYS/TEMP]")


def test_what_each_agent_said_is_appended_to_the_refusals_reason(
    caplog: pytest.LogCaptureFixture,
) -> None:
    tries = Fallback("smtp", (HOME, A, HOME))
    with caplog.at_level(logging.WARNING, "appliance.proxy"):
        tries.failed(HOME, "offline: alice-home is not online", agent="offline")
        tries.failed(A, "Connection refused")  # (a plain upstream adds nothing)
        tries.failed(HOME, "timeout: no stream in 5 s", agent="timeout")
    r = tries.refusal("alice", None)
    assert r.reason == "no upstream reachable (the agent: offline) (the agent: timeout)"
    first = failures(caplog)[0]
    assert first == "smtp upstream smtp/home failed: offline: alice-home is not online"
    assert len(failures(caplog)) == 3


def test_no_upstream_at_all_refuses_at_once() -> None:
    tries = Fallback("smtp")
    assert tries.next() is None
    r = tries.refusal(None, None)
    assert (r.kind, r.reason, r.user, r.rule) == ("unavailable", NO_UPSTREAM, None, None)


@pytest.mark.parametrize("splice", [False, True])
def test_both_paths_try_every_upstream_in_turn_and_count_each_failure(
    splice: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """Two site servers down, the third up: the guest is served by the third and each
    dead one is one failure; with all three down, one "no upstream" refusal."""
    dead = [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]

    async def body() -> tuple[bytes, bytes, Relay]:
        loop = asyncio.get_running_loop()
        up_port = free_port()
        upstream = await loop.create_server(Echo, "127.0.0.1", up_port)
        port = free_port()
        t = table(up_port, port)
        t["servers"]["smtp"] = [*dead, f"127.0.0.1:{up_port}"]
        relay = Relay(StaticGate(t), connect_timeout=1.0, idle_timeout=5.0, splice=splice)
        await relay.start("127.0.0.1", (Listener("smtp", "smtp", port),))
        r, w = await asyncio.open_connection("127.0.0.1", port)
        served = await read_until(r, b"\n")
        w.close()
        upstream.close()
        await upstream.wait_closed()
        r, w = await asyncio.open_connection("127.0.0.1", port)  # now all three are down
        refused = await read_until(r, b"\n")
        w.close()
        await asyncio.sleep(0.05)
        await relay.stop()
        return served, refused, relay

    before = UPSTREAM_FAILURES["smtp"]
    with caplog.at_level(logging.WARNING, "appliance.proxy"):
        served, refused, relay = run(body())
    assert served == b"HELLO\n"
    assert refused.startswith(b"421 4.3.0")
    assert UPSTREAM_FAILURES["smtp"] == before + 2 + 3
    lines = failures(caplog)
    assert len(lines) == 5 and all(line.startswith("smtp upstream ") for line in lines)
    assert relay.counters[("smtp", "ok")] == 1
    assert relay.counters[("smtp", "upstream-down")] == 1


def test_a_refused_connect_on_the_stock_loop_is_described_without_its_address() -> None:
    """asyncio's own loop says "Connect call failed ('127.0.0.1', 54765)": the reason kept
    for the log is the errno's words only."""
    import asyncio
    import socket

    from appliance.proxy.tracked import failure

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: refused

        async def go() -> OSError:
            try:
                await asyncio.open_connection("127.0.0.1", port)
            except OSError as exc:
                return exc
            raise AssertionError("connected")

        exc = asyncio.new_event_loop().run_until_complete(go())
    assert str(port) in str(exc)  # what the stock loop says ...
    assert failure(exc) == "Connection refused"  # ... and what the log gets
