"""The splice path for plain tcp services: its edge-triggered epoll, connect deadlines,
refusals, revocation and the batched access log, on loopback with real sockets."""

from __future__ import annotations

import asyncio
import errno
import os
import select
import socket
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from relay_helpers import Echo, free_port, loop_kind, read_until, run, table  # noqa: F401

from appliance.proxy.access_log import AccessLog
from appliance.proxy.gate import Listener, StaticGate
from appliance.proxy.relay import Relay
from appliance.proxy.splice import EdgePoll

pytestmark = pytest.mark.unit


@pytest.fixture
def hanging() -> Iterator[int]:
    """A port whose connects never complete: a listener with a full accept queue (backlog
    0 holds one connection, never accepted), so the kernel drops further SYNs."""
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(0)
    filler = socket.create_connection(lsock.getsockname())
    yield int(lsock.getsockname()[1])
    filler.close()
    lsock.close()


def bulk_table(relay_port: int, servers: list[str], **user: Any) -> dict[str, Any]:
    t = table(1, relay_port, allow=["bulk"], **user)
    t["listeners"] = [{"service": "bulk", "protocol": "tcp", "port": relay_port}]
    t["servers"] = {"bulk": servers}
    return t


async def start(t: dict[str, Any], **kw: Any) -> tuple[Relay, StaticGate]:
    gate = StaticGate(t)
    relay = Relay(gate, splice=True, **kw)
    port = t["listeners"][0]["port"]
    await relay.start("127.0.0.1", (Listener("bulk", "tcp", port),))
    return relay, gate


def test_a_hanging_upstream_times_out_and_the_next_one_serves(
    hanging: int, caplog: pytest.LogCaptureFixture
) -> None:
    async def body() -> None:
        loop = asyncio.get_running_loop()
        up_port = free_port()
        upstream = await loop.create_server(Echo, "127.0.0.1", up_port)
        port = free_port()
        t = bulk_table(port, [f"127.0.0.1:{hanging}", f"127.0.0.1:{up_port}"])
        relay, _gate = await start(t, connect_timeout=0.3)
        t0 = loop.time()
        r, w = await asyncio.open_connection("127.0.0.1", port)
        assert await read_until(r, b"\n") == b"HELLO\n"
        assert 0.25 <= loop.time() - t0 < 2.0  # waited for the deadline, then moved on
        w.write(b"abc\n")
        assert await read_until(r, b"\n") == b"ABC\n"
        w.close()
        await relay.stop()
        upstream.close()

    run(body())
    assert "bulk upstream bulk/site failed: connect timed out" in caplog.text
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings and not any("127.0.0.1" in w for w in warnings)  # names, never addresses


def test_no_upstream_answers_the_guest_is_closed_and_counted(hanging: int) -> None:
    async def body() -> None:
        port = free_port()
        t = bulk_table(port, [f"127.0.0.1:{hanging}", f"127.0.0.1:{free_port()}"])
        relay, _gate = await start(t, connect_timeout=0.2)
        r, w = await asyncio.open_connection("127.0.0.1", port)
        assert await asyncio.wait_for(r.read(), 5) == b""
        w.close()
        await asyncio.sleep(0.05)
        assert relay.counters[("bulk", "upstream-down")] == 1
        assert not relay.conns and not relay.connecting
        await relay.stop()

    run(body())


def test_a_table_change_reaches_a_connection_still_connecting(hanging: int) -> None:
    async def body() -> None:
        port = free_port()
        relay, gate = await start(bulk_table(port, [f"127.0.0.1:{hanging}"]), connect_timeout=5)
        r, w = await asyncio.open_connection("127.0.0.1", port)
        await asyncio.sleep(0.1)
        assert len(relay.connecting) == 1
        gate.table["users"]["127.0.0.1"]["allow"] = []
        gate.reload()  # revoked while its upstream is still connecting: closed, not relayed later
        assert await asyncio.wait_for(r.read(), 5) == b""
        w.close()
        assert not relay.connecting and not relay.conns
        assert relay.counters[("bulk", "revoked")] == 1
        await relay.stop()

    run(body())


def test_spliced_connections_are_revoked_idled_out_and_limited() -> None:
    async def body() -> None:
        loop = asyncio.get_running_loop()
        up_port = free_port()
        upstream = await loop.create_server(Echo, "127.0.0.1", up_port)
        port = free_port()
        t = bulk_table(port, [f"127.0.0.1:{up_port}"], max_connections=2)
        relay, gate = await start(t, connect_timeout=1.0, idle_timeout=0.6)
        conns = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]
        for r, _w in conns[:2]:
            assert await read_until(r, b"\n") == b"HELLO\n"
        assert await asyncio.wait_for(conns[2][0].read(), 5) == b""  # over the limit
        assert relay.counters[("bulk", "refused-limit")] == 1
        gate.table["users"]["127.0.0.1"]["allow"] = []
        gate.reload()  # the table no longer allows it: open connections close at once
        for r, _w in conns[:2]:
            assert await asyncio.wait_for(r.read(), 5) == b""
        assert relay.counters[("bulk", "revoked")] == 2
        gate.table["users"]["127.0.0.1"]["allow"] = ["bulk"]
        gate.reload()
        r, w = await asyncio.open_connection("127.0.0.1", port)
        assert await read_until(r, b"\n") == b"HELLO\n"
        assert await asyncio.wait_for(r.read(), 5) == b""  # nothing moved: idled out
        assert relay.counters[("bulk", "idle-timeout")] == 1
        for _r, w2 in [*conns, (r, w)]:
            w2.close()
        assert not relay.counts
        await relay.stop()
        upstream.close()

    run(body())


class FailingListener:
    """A listener whose accept fails as it does when the process is out of descriptors."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def fileno(self) -> int:
        return self.sock.fileno()

    def _accept(self) -> tuple[int, Any]:
        raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))


def test_accept_failures_pause_the_listener_and_are_counted() -> None:
    async def body() -> None:
        port = free_port()
        relay, _gate = await start(bulk_table(port, ["127.0.0.1:9"]))
        lsock = relay.raw_listeners[0]
        ls = Listener("bulk", "tcp", port)
        modified: list[int] = []
        real_modify = relay.edges.modify
        relay.edges.modify = lambda fd, mask: (modified.append(mask), real_modify(fd, mask))  # type: ignore[method-assign,func-returns-value]
        relay._accept(FailingListener(lsock), ls)  # type: ignore[arg-type]
        assert relay.counters[("bulk", "accept-failed")] == 1
        assert modified == [0]  # not watched for a moment: no busy loop on EMFILE
        await asyncio.sleep(0.2)
        assert modified == [0, select.EPOLLIN]
        await relay.stop()

    run(body())


def test_edge_poll_closes_after_the_batch_and_survives_a_failing_handler() -> None:
    async def body() -> None:
        loop = asyncio.get_running_loop()
        poll = EdgePoll(loop)
        a, b = socket.socketpair()
        c, d = socket.socketpair()
        seen: list[str] = []

        def first(_ev: int) -> None:
            seen.append("first")
            poll.close(a)
            assert a.fileno() >= 0  # still open: closed after the batch
            raise RuntimeError("a bug in one handler")

        def second(_ev: int) -> None:
            seen.append("second")

        poll.watch(a.fileno(), first)
        poll.watch(c.fileno(), second)
        b.send(b"x")
        d.send(b"y")
        await asyncio.sleep(0.05)
        assert sorted(seen) == ["first", "second"]  # the other edge was not lost
        assert a.fileno() == -1 and a.fileno() not in poll.handlers
        poll.shutdown()
        for s in (b, c, d):
            s.close()

    run(body())


def test_access_lines_are_batched_and_flushed(monkeypatch: pytest.MonkeyPatch) -> None:
    import logging

    monkeypatch.setenv("JOURNAL_STREAM", "8:123")
    logging.getLogger("appliance.proxy.access").setLevel(logging.INFO)
    r, w = os.pipe()
    os.set_blocking(r, False)

    async def body() -> None:
        log = AccessLog(asyncio.get_running_loop(), fd=w)
        log.connection(0.0, "alice", "192.168.1.11", "bulk", "staff", "bulk/site", 3, 4, "ok")
        log.connection(0.0, None, "192.168.1.12", "bulk", None, None, 0, 0, "refused-login")
        with pytest.raises(BlockingIOError):
            os.read(r, 4096)  # nothing yet: lines wait for the batch
        await asyncio.sleep(0.3)
        out = os.read(r, 4096).decode().splitlines()
        assert len(out) == 2
        assert out[0].startswith("<6>appliance.proxy.access: time=1970-01-01T00:00:00Z ")
        assert "user=alice ip=192.168.1.11 service=bulk rule=staff upstream=bulk/site" in out[0]
        assert out[0].endswith("bytes_up=3 bytes_down=4 " + out[0].split()[-2] + " result=ok")
        assert "user=- ip=192.168.1.12" in out[1] and out[1].endswith("result=refused-login")
        log.connection(0.0, "bob", "192.168.1.13", "bulk", "r", "x", 0, 0, "ok")
        log.flush()  # a stop writes what is left at once
        assert b"user=bob" in os.read(r, 4096)

    try:
        run(body())
    finally:
        os.close(r)
        os.close(w)


class RawEcho(asyncio.Protocol):
    """An upstream that echoes bytes as they are and closes after the client's EOF."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.t.write(data)  # type: ignore[attr-defined]

    def eof_received(self) -> bool:
        self.t.close()  # type: ignore[attr-defined]
        return True


async def echo_relay(
    upstream_protocol: Callable[[], asyncio.Protocol] = RawEcho,
) -> tuple[Relay, asyncio.AbstractServer, int]:
    """A relay on a fresh port in front of an upstream speaking `upstream_protocol`."""
    loop = asyncio.get_running_loop()
    up_port = free_port()
    upstream = await loop.create_server(upstream_protocol, "127.0.0.1", up_port)
    port = free_port()
    relay, _gate = await start(bulk_table(port, [f"127.0.0.1:{up_port}"]))
    return relay, upstream, port


async def recv_exactly(s: socket.socket, n: int) -> bytes:
    """n bytes from a non-blocking socket (the relay runs in the same loop)."""
    loop = asyncio.get_running_loop()
    got = b""
    while len(got) < n:
        chunk = await asyncio.wait_for(loop.sock_recv(s, 1 << 20), 5)
        assert chunk
        got += chunk
    return got


def test_small_exchanges_are_copied_and_bulk_goes_to_splice() -> None:
    async def body() -> None:
        relay, upstream, port = await echo_relay()
        r, w = await asyncio.open_connection("127.0.0.1", port)
        for line in (b"EHLO guest\r\n", b"MAIL FROM:<a@b>\r\n", b"QUIT\r\n"):
            w.write(line)
            assert await read_until(r, b"\r\n") == line
        assert relay.pool.open == 0  # no pipe was ever needed: the copy path moved them
        # then 8 MiB each way, the reader held back a while: flow control, then identical
        data = os.urandom(8 << 20)
        w.write(data)
        await asyncio.sleep(0.3)
        got = await asyncio.wait_for(r.readexactly(len(data)), 20)
        assert got == data
        assert relay.pool.open >= 1  # full buffers switched the directions to splice
        w.write_eof()  # half-close: the echo closes after it, and so does the relay
        assert await asyncio.wait_for(r.read(), 5) == b""
        w.close()
        await asyncio.sleep(0.05)
        assert relay.counters[("bulk", "ok")] == 1 and not relay.conns
        await relay.stop()
        upstream.close()

    run(body())


def test_many_tiny_segments_all_arrive() -> None:
    """A read that comes back short is taken as an empty queue (no second read): a
    client that sends a burst of one-byte segments and waits still gets every echo."""

    async def body() -> None:
        relay, upstream, port = await echo_relay()
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.setblocking(False)
            loop = asyncio.get_running_loop()
            sent = bytes(range(256)) * 4
            for i in range(len(sent)):
                await loop.sock_sendall(s, sent[i : i + 1])
            assert await recv_exactly(s, len(sent)) == sent
        await relay.stop()
        upstream.close()

    run(body())


class Batches(asyncio.Protocol):
    """An upstream that answers only once it has a whole batch (its sizes in order), with
    the batch: until then nothing moves toward the guest, so no edge but the guest's own
    can wake the relay's reading side."""

    def __init__(self, sizes: list[int]) -> None:
        self.sizes = sizes
        self.buf = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while self.sizes and len(self.buf) >= self.sizes[0]:
            n = self.sizes.pop(0)
            self.t.write(self.buf[:n])  # type: ignore[attr-defined]
            self.buf = self.buf[n:]


@pytest.mark.parametrize("bulk_first", [False, True])
def test_urgent_data_does_not_stall_a_direction(bulk_first: bool) -> None:
    """A read stops short at the urgent mark (telnet's interrupt, FTP's ABOR) and splice
    cannot pass it at all: the bytes behind it must still go on, copy path or bulk."""

    async def body() -> None:
        loop = asyncio.get_running_loop()
        sizes = [1 << 20, 200] if bulk_first else [200]
        relay, upstream, port = await echo_relay(lambda: Batches(sizes))
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.setblocking(False)
            await asyncio.sleep(0.1)  # relayed and idle: what follows comes as new edges
            if bulk_first:  # full buffers: both directions are bulk (splice) from here
                data = os.urandom(1 << 20)
                await loop.sock_sendall(s, data)
                assert await recv_exactly(s, len(data)) == data
                assert relay.pool.open >= 1
            s.send(b"A" * 100 + b"!", socket.MSG_OOB)  # the last byte is the urgent one
            s.send(b"B" * 100)
            # the urgent byte is out of band (not relayed); every byte around it arrives
            assert await recv_exactly(s, 200) == b"A" * 100 + b"B" * 100
        await relay.stop()
        upstream.close()

    run(body())


def test_deadlines_keep_one_timer_when_a_waiter_starts_again_as_it_expires() -> None:
    """A connect that times out and moves to the next upstream starts its wait again from
    inside the timer's callback: that must not leave a second timer behind (one more per
    such moment, for ever, was found in review)."""
    from appliance.proxy.raw import Deadlines

    async def body() -> None:
        loop = asyncio.get_running_loop()
        handles: list[asyncio.TimerHandle] = []
        real = loop.call_later

        def call_later(delay: float, cb: Any, *args: Any) -> asyncio.TimerHandle:
            h = real(delay, cb, *args)
            if getattr(cb, "__self__", None) is d:  # (the sleeps here are timers too)
                handles.append(h)
            return h

        loop.call_later = call_later  # type: ignore[method-assign]
        d = Deadlines(loop, 0.03)

        class Retrying:
            tries = 0

            def expired(self) -> None:
                self.tries += 1
                if self.tries < 8:
                    d.start(self)  # the next upstream: a new wait, from the callback
                now = loop.time() + 0.005  # (uvloop fires timers up to a millisecond early)
                most[0] = max(
                    most[0], sum(1 for h in handles if not h.cancelled() and h.when() > now)
                )

        most = [0]  # timers pending at once, the most seen
        waiters = [Retrying() for _ in range(3)]
        for w in waiters:
            d.start(w)
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.6)
        pending = [h for h in handles if not h.cancelled() and h.when() > loop.time()]
        assert all(w.tries == 8 for w in waiters) and not d.due
        assert len(pending) <= 1 and most[0] <= 1, (len(pending), most)
        d.cancel()

    run(body())
