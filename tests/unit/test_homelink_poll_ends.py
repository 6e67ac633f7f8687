"""The two ends of a long-poll link in memory: the relay's `PollSession` driven by its
up and down requests as the HTTP front would call them, and the `PollClient` over a
scripted HTTP connection.

What matters: concurrent and repeated down requests lose and repeat nothing; a sender
that outruns its reader waits; a front's passing 502 is retried; a pin that fails on
a new connection closes the link at once instead of leaving it hung."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosedError, ConnectionClosedOK

from appliance.homelink import poll
from appliance.homelink.link import LinkDown
from appliance.homelink.poll import HIGH_WATER
from appliance.homelink.poll_client import PollClient
from appliance.homerelay.poll_front import PollSession

pytestmark = pytest.mark.unit


def run(coro: Coroutine[Any, Any, None]) -> None:
    asyncio.run(asyncio.wait_for(coro, 10))


def session() -> tuple[PollSession, list[str]]:
    forgotten: list[str] = []
    return PollSession("a" * 32, "/v1/appliance", ("192.0.2.9", 1), forgotten.append), forgotten


def test_an_older_down_request_answers_empty_and_a_lost_answer_is_sent_again() -> None:
    async def body() -> None:
        s, _ = session()
        have0 = poll.NUMBER.pack(0)
        older = asyncio.create_task(s.down(have0))
        await asyncio.sleep(0.01)
        newer = asyncio.create_task(s.down(have0))  # the client gave up on the first
        await asyncio.sleep(0.01)
        await s.send(b"one")
        await s.send(b"two")
        assert poll.decode_batch(await older) == (0, [])
        first, messages = poll.decode_batch(await newer)
        assert first == 0 and [m.payload for m in messages] == [b"one", b"two"]
        # that answer is lost: the same request again gets the same messages
        first, again = poll.decode_batch(await s.down(have0))
        assert (first, again) == (0, messages)
        # acknowledged, they are gone; the next waits for the next message
        later = asyncio.create_task(s.down(poll.NUMBER.pack(2)))
        await asyncio.sleep(0.01)
        assert not later.done()
        await s.send(b"three")
        assert poll.decode_batch(await later) == (2, [poll.of_value(b"three")])

    run(body())


def test_an_up_request_waits_while_the_relay_has_not_read_what_came() -> None:
    async def body() -> None:
        s, _ = session()
        chunk = b"x" * (256 * 1024)
        n = 0
        while True:  # ups are answered until the relay holds more than HIGH_WATER unread
            up = asyncio.create_task(s.up(poll.encode_batch(n, [poll.of_value(chunk)])))
            await asyncio.sleep(0.02)
            n += 1
            if not up.done():
                break
            assert up.result() == poll.NUMBER.pack(n)
        assert s.received_bytes > HIGH_WATER and n * len(chunk) < 2 * HIGH_WATER
        for _ in range(n):
            assert await s.recv() == chunk  # read: the waiting up is answered
        assert await up == poll.NUMBER.pack(n)  # and nothing was dropped

    run(body())


def test_a_relay_close_lingers_until_acknowledged_then_the_session_is_forgotten() -> None:
    async def body() -> None:
        s, forgotten = session()
        closing = asyncio.create_task(s.close(4403, "claimed by another key"))
        answer = await s.down(poll.NUMBER.pack(0))
        await closing
        assert s.closed and forgotten == []  # the answer may be lost: it can be asked again
        assert poll.decode_batch(await s.down(poll.NUMBER.pack(0))) == poll.decode_batch(answer)
        await s.down(poll.NUMBER.pack(1))
        assert forgotten == ["a" * 32]
        with pytest.raises(ConnectionClosedError):
            await s.recv()

    run(body())


Script = Callable[[str, bytes], tuple[int, bytes]]


class FakeHttp:
    """What `PollClient` posts through, scripted: `answer(path, body)` gives (status,
    answer) or raises; a down request with nothing to say waits a little."""

    def __init__(self, answer: Script) -> None:
        self.answer = answer

    async def post(self, path: str, body: bytes, session: str = "") -> tuple[int, bytes]:
        assert session == "s" * 32
        await asyncio.sleep(0.01)
        return self.answer(path, body)

    def drop(self) -> None:
        pass


def test_a_fronts_passing_502_is_retried_and_nothing_is_lost() -> None:
    async def body() -> None:
        statuses = [502, 503]

        def answer(path: str, have: bytes) -> tuple[int, bytes]:
            if path == poll.UP_PATH:
                return 200, poll.NUMBER.pack(0)
            if statuses:
                return statuses.pop(0), b"<html>bad gateway</html>"
            n = poll.decode_number(have)
            if n == 0:
                return 200, poll.encode_batch(0, [poll.of_value(b"hello")])
            return 200, poll.encode_batch(n, [poll.close_message(1000, "bye")])

        client = PollClient("s" * 32, lambda: FakeHttp(answer))  # type: ignore[arg-type, return-value]
        assert await client.recv() == b"hello"
        assert client.retries == 2
        with pytest.raises(ConnectionClosedOK):
            await client.recv()

    run(body())


@pytest.mark.parametrize("status", [404, 400])
def test_the_relays_verdict_on_a_session_ends_the_link(status: int) -> None:
    async def body() -> None:
        client = PollClient("s" * 32, lambda: FakeHttp(lambda p, b: (status, b"")))  # type: ignore[arg-type, return-value]
        with pytest.raises(ConnectionClosedError):
            await client.recv()
        assert client.retries == 0

    run(body())


def test_a_pin_that_fails_on_a_new_connection_closes_the_link_at_once() -> None:
    async def body() -> None:
        def answer(path: str, have: bytes) -> tuple[int, bytes]:
            raise LinkDown("relay certificate pin mismatch")

        client = PollClient("s" * 32, lambda: FakeHttp(answer))  # type: ignore[arg-type, return-value]
        with pytest.raises(ConnectionClosedError) as closed:
            await asyncio.wait_for(client.recv(), 2)  # not the 10 s of an unreachable relay
        assert closed.value.sent is not None and "pin mismatch" in closed.value.sent.reason
        assert client.retries == 0
        with pytest.raises(ConnectionClosedError):
            await client.send(b"more")

    run(body())
