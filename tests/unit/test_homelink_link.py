"""The asyncio link: streams over a WebSocket that dies and is dialled again.

Between the two ends sits a dumb pairing relay (one agent, one appliance, every
message passed on as it is; a side that is away loses what was sent to it), so
these tests exercise only the link and the stream ends, on real WebSockets.  The
relay server itself has its own tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import http
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import pytest
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from appliance.homelink import frames
from appliance.homelink.frames import Kind, Reset
from appliance.homelink.link import Link, LinkStream

pytestmark = pytest.mark.unit


class PairingRelay:
    """Passes every message from the agent side to the appliance side and back."""

    def __init__(self) -> None:
        self.sides: dict[str, ServerConnection] = {}
        self.port = 0
        self.cut = False  # while set, new WebSockets are refused
        self.forwarded = 0
        self.lose: Callable[[str, bytes], bool] = lambda side, message: False

    async def handler(self, ws: ServerConnection) -> None:
        if self.cut:
            await ws.close(1013, "cut")
            return
        side = ws.request.path if ws.request else "?"
        other = "/appliance" if side == "/agent" else "/agent"
        self.sides[side] = ws
        try:
            async for message in ws:
                peer = self.sides.get(other)
                if peer is not None and not self.lose(side, message):
                    self.forwarded += 1
                    with contextlib.suppress(ConnectionClosed):
                        await peer.send(message)
        except ConnectionClosed:
            pass  # a side dropped (the tests do that)
        finally:
            if self.sides.get(side) is ws:
                del self.sides[side]

    def drop(self, side: str) -> None:
        """The side's TCP connection dies without a close (a NAT mapping lost)."""
        ws = self.sides.pop(side, None)
        if ws is not None:
            ws.transport.abort()

    def dial(self, side: str):  # type: ignore[no-untyped-def]
        async def dial():  # type: ignore[no-untyped-def]
            return await connect(
                f"ws://127.0.0.1:{self.port}{side}",
                compression=None,
                ping_interval=0.5,
                ping_timeout=1,
                close_timeout=1,
                proxy=None,
                max_size=frames.MAX_FRAME + 256,
            )

        return dial


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.write_eof()
    await writer.drain()
    writer.close()


@asynccontextmanager
async def rig(
    linger: float = 30.0, refuse: bool = False
) -> AsyncIterator[tuple[PairingRelay, Link, Link]]:
    relay = PairingRelay()
    echo = await asyncio.start_server(_echo, "127.0.0.1", 0)
    echo_port = echo.sockets[0].getsockname()[1]

    async def accept(ls: LinkStream) -> None:
        if refuse:
            ls.abort(Reset.REFUSED, "local service down")
            return
        reader, writer = await asyncio.open_connection("127.0.0.1", echo_port)
        ls.hold()
        await ls.bridge(reader, writer)

    async with serve(
        relay.handler, "127.0.0.1", 0, compression=None, max_size=frames.MAX_FRAME + 256
    ) as srv:
        relay.port = srv.sockets[0].getsockname()[1]
        agent = Link(relay.dial("/agent"), name="agent", accept=accept, linger=linger)
        appliance = Link(relay.dial("/appliance"), name="appliance", linger=linger)
        tasks = [asyncio.ensure_future(agent.run()), asyncio.ensure_future(appliance.run())]
        try:
            await asyncio.wait_for(agent.up.wait(), 5)
            await asyncio.wait_for(appliance.up.wait(), 5)
            yield relay, agent, appliance
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            echo.close()


async def _round_trip(ls: LinkStream, payload: bytes, during=None) -> bytes:  # type: ignore[no-untyped-def]
    """Send `payload` through the echo and read it all back; `during` runs mid-way."""

    async def send() -> None:
        for i in range(0, len(payload), 100_000):
            await ls.write(payload[i : i + 100_000])
            if during is not None and i >= len(payload) // 3 and not cut_done:
                cut_done.append(True)
                await during()
        ls.close()

    cut_done: list[bool] = []
    sender = asyncio.ensure_future(send())
    got = bytearray()
    while data := await ls.read():
        got += data
    await sender
    return bytes(got)


def test_bytes_through_the_link_arrive_exact() -> None:
    async def main() -> None:
        async with rig() as (_, _agent, appliance):
            ls = appliance.open("bob-home")
            assert await ls.wait_opened(5) is None
            payload = os.urandom(6 << 20)
            got = await asyncio.wait_for(_round_trip(ls, payload), 30)
            assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()

    asyncio.run(main())


@pytest.mark.parametrize("side", ["/agent", "/appliance"])
def test_a_dropped_link_loses_and_duplicates_nothing(side: str) -> None:
    async def main() -> None:
        async with rig() as (relay, agent, appliance):
            ls = appliance.open("bob-home")
            assert await ls.wait_opened(5) is None
            payload = os.urandom(8 << 20)
            links_before = agent.counters["links"] + appliance.counters["links"]

            async def cut() -> None:
                relay.drop(side)

            got = await asyncio.wait_for(_round_trip(ls, payload, during=cut), 60)
            assert len(got) == len(payload)
            assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
            assert agent.counters["links"] + appliance.counters["links"] > links_before
            # Both directions were resent only from where the peer stood.
            assert ls.stream.duplicates_dropped <= 2 * ls.stream.window

    asyncio.run(main())


def test_a_refused_open_is_an_answer_not_a_hang() -> None:
    async def main() -> None:
        async with rig(refuse=True) as (_, _agent, appliance):
            ls = appliance.open("bob-home")
            assert await ls.wait_opened(5) is Reset.REFUSED
            with pytest.raises(ConnectionResetError):
                await ls.read()

    asyncio.run(main())


def test_a_peer_that_never_comes_back_expires_the_stream() -> None:
    async def main() -> None:
        async with rig(linger=1.0) as (relay, _agent, appliance):
            ls = appliance.open("bob-home")
            assert await ls.wait_opened(5) is None
            relay.cut = True
            relay.drop("/agent")
            await ls.write(b"hello")  # nobody will acknowledge it
            with pytest.raises(ConnectionResetError):
                async with asyncio.timeout(10):
                    while True:
                        await ls.read()
            assert ls.stream.reset_code is Reset.EXPIRED
            assert appliance.counters["streams_expired"] == 1

    asyncio.run(main())


def test_a_resume_for_a_stream_the_agent_never_held_is_reset() -> None:
    async def main() -> None:
        async with rig() as (relay, agent, appliance):
            ls = appliance.open("bob-home")
            assert await ls.wait_opened(5) is None
            agent.streams.clear()  # as if the agent had restarted
            relay.drop("/appliance")
            with pytest.raises(ConnectionResetError):
                async with asyncio.timeout(10):
                    await ls.read()
            assert ls.stream.reset_code is Reset.UNKNOWN
            assert agent.counters["unknown_streams"] == 1

    asyncio.run(main())


def test_a_refused_handshake_is_retried_with_backoff_not_the_end_of_the_link() -> None:
    async def main() -> None:
        dials = 0

        def refuse(conn, request):  # type: ignore[no-untyped-def]
            return conn.respond(http.HTTPStatus.TOO_MANY_REQUESTS, "too many links\n")

        async with serve(lambda ws: None, "127.0.0.1", 0, process_request=refuse) as srv:
            port = srv.sockets[0].getsockname()[1]

            async def dial():  # type: ignore[no-untyped-def]
                nonlocal dials
                dials += 1
                return await connect(f"ws://127.0.0.1:{port}/v1/appliance", proxy=None)

            link = Link(dial, name="relay")
            task = asyncio.ensure_future(link.run())
            await asyncio.sleep(2.5)
            assert not task.done()
            assert dials >= 2  # backoff 0.5, 1, 2 s (full jitter): at least one retry
            assert "429" in link.last_error
            task.cancel()

    asyncio.run(main())


def test_a_stream_that_ended_here_still_answers_a_peer_that_missed_its_last_ack() -> None:
    async def main() -> None:
        async with rig() as (relay, agent, appliance):
            held: list[LinkStream] = []
            inner = agent.accept
            assert inner is not None

            async def accept(ls: LinkStream) -> None:
                held.append(ls)
                await inner(ls)

            agent.accept = accept
            lost: list[bytes] = []

            def lose(side: str, message: bytes) -> bool:
                frame = frames.decode(message)
                # the appliance's ACK of the agent's FIN (5 bytes echoed: ACK 6), once
                ack = side == "/appliance" and frame.kind is Kind.ACK and frame.offset == 6
                if ack and not lost:
                    lost.append(message)
                    return True
                return False

            relay.lose = lose
            ls = appliance.open("bob-home")
            assert await ls.wait_opened(5) is None
            await ls.write(b"hello")
            ls.close()
            got = b""
            while data := await ls.read():
                got += data
            assert got == b"hello"
            async with asyncio.timeout(5):
                while ls.token in appliance.streams or not lost:
                    await asyncio.sleep(0.02)
            # the appliance is done with it; the agent still waits for that ACK
            assert ls.stream.done and held and not held[0].stream.done
            relay.drop("/agent")  # its link breaks before the ACK ever comes
            async with asyncio.timeout(10):
                while not held[0].stream.done:
                    await asyncio.sleep(0.05)
            assert held[0].stream.reset_code is None  # ended cleanly, not UNKNOWN
            assert appliance.counters["unknown_streams"] == 0

    asyncio.run(main())
