"""The relay core on loopback: a static gate, real sockets, real event loop."""

from __future__ import annotations

import asyncio
import contextlib
import re
from typing import ClassVar, cast

import pytest
from relay_helpers import (  # noqa: F401  (loop_kind: a fixture, used by every test)
    PORTAL,
    Echo,
    free_port,
    loop_kind,
    read_until,
    resolver,
    run,
    table,
)

from appliance.proxy.gate import Listener, Refusal, StaticGate
from appliance.proxy.refusals import RefusalDialog, http_refusal, pop3_reply, smtp_reply
from appliance.proxy.relay import Relay

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("kind", ["login", "denied", "limit", "unavailable"])
def test_refusal_words_never_name_an_address(kind: str) -> None:
    r = Refusal(kind, "why", PORTAL, "alice", "staff")  # type: ignore[arg-type]
    texts = [smtp_reply(r), pop3_reply(r), http_refusal(r, True)[1].decode()]
    for t in texts:
        assert "198.51.100" not in t and "203.0.113" not in t
    if kind == "login":
        assert smtp_reply(r).startswith("530 5.7.0") and PORTAL in smtp_reply(r)
        assert pop3_reply(r).startswith("-ERR [AUTH]") and PORTAL in pop3_reply(r)
        assert http_refusal(r, True)[0] == 302 and http_refusal(r, False)[0] == 511
    if kind == "denied":
        assert smtp_reply(r).startswith("554 5.7.1 access denied by site policy")
        assert pop3_reply(r).startswith("-ERR [SYS/PERM]")
        status, body = http_refusal(r, True)
        assert status == 403 and b"staff" in body
    if kind == "unavailable":
        assert smtp_reply(r).startswith("421 4.3.0")
        assert pop3_reply(r).startswith("-ERR [SYS/TEMP]")
        assert http_refusal(r, True)[0] == 502


def test_smtp_dialog_refuses_the_transaction_and_says_goodbye() -> None:
    d = RefusalDialog("smtp", Refusal("denied", "x", PORTAL, "bob", None))
    assert d.greeting().startswith(b"220 ")
    assert d.feed(b"EHLO me\r\n").startswith(b"250")
    assert d.feed(b"MAIL FROM:<a@b>\r\n").startswith(b"554 5.7.1")
    assert d.feed(b"QUIT\r\n").startswith(b"221") and d.closed


def test_pop3_dialog_announces_resp_codes() -> None:
    d = RefusalDialog("pop3", Refusal("login", "x", PORTAL))
    assert d.greeting().startswith(b"+OK")
    assert b"AUTH-RESP-CODE" in d.feed(b"CAPA\r\n")
    assert d.feed(b"USER alice\r\n").startswith(b"-ERR [AUTH]")


def test_a_flood_of_empty_lines_gets_a_bounded_answer() -> None:
    """A refused guest streaming newlines must not make the proxy talk 50 times more."""
    d = RefusalDialog("smtp", Refusal("denied", "x", PORTAL, "bob", None))
    d.greeting()
    out = d.feed(b"\n" * 1_000_000)
    assert d.closed and len(out) < 2_000


@pytest.mark.parametrize("splice", [False, True])
def test_relays_both_ways_with_fallback_and_half_close(splice: bool) -> None:
    async def body() -> None:
        loop = asyncio.get_running_loop()
        up_port = free_port()
        upstream = await loop.create_server(Echo, "127.0.0.1", up_port)
        port = free_port()
        gate = StaticGate(table(up_port, port))
        relay = Relay(gate, connect_timeout=1.0, idle_timeout=5.0, splice=splice)
        await relay.start("127.0.0.1", (Listener("smtp", "smtp", port),))
        # a client that speaks first and half-closes before the upstream is even connected
        r0, w0 = await asyncio.open_connection("127.0.0.1", port)
        w0.write(b"early\n")
        w0.write_eof()
        assert await asyncio.wait_for(r0.read(), 5) == b"HELLO\nEARLY\nBYE\n"
        w0.close()
        r, w = await asyncio.open_connection("127.0.0.1", port)
        assert await read_until(r, b"\n") == b"HELLO\n"  # the first site server is down
        w.write(b"abc\n")
        assert await read_until(r, b"\n") == b"ABC\n"
        w.write_eof()  # half-close: we still read the answer
        assert await read_until(r, b"BYE\n") == b"BYE\n"
        assert await asyncio.wait_for(r.read(), 5) == b""
        w.close()
        await asyncio.sleep(0.1)
        assert relay.counters[("smtp", "ok")] == 2
        assert not relay.conns and not relay.counts
        await relay.stop()
        upstream.close()

    run(body())


async def refusing_smtp(splice: bool) -> tuple[Relay, int]:
    """A relay on an SMTP port whose only guest may use POP3, not SMTP."""
    port = free_port()
    relay = Relay(StaticGate(table(1, port, allow=["pop3"])), splice=splice)
    await relay.start("127.0.0.1", (Listener("smtp", "smtp", port),))
    return relay, port


@pytest.mark.parametrize("splice", [False, True])
def test_denied_user_gets_554_and_counter(splice: bool) -> None:
    async def body() -> None:
        relay, port = await refusing_smtp(splice)
        r, w = await asyncio.open_connection("127.0.0.1", port)
        assert (await read_until(r, b"\n")).startswith(b"220")
        w.write(b"EHLO x\r\nMAIL FROM:<a@b>\r\nQUIT\r\n")
        assert (await read_until(r, b"\n")).startswith(b"250")
        line = await read_until(r, b"\n")
        assert line.startswith(b"554 5.7.1 access denied by site policy")
        assert (await read_until(r, b"\n")).startswith(b"221")
        w.close()
        await asyncio.sleep(0.05)
        assert relay.counters[("smtp", "refused-denied")] == 1
        await relay.stop()

    run(body())


@pytest.mark.parametrize("splice", [False, True])
def test_upstream_down_is_421_and_pop_sys_temp(splice: bool) -> None:
    async def body() -> None:
        port = free_port()
        t = table(free_port(), port)
        t["servers"] = {"smtp": [f"127.0.0.1:{free_port()}"], "pop3": [f"127.0.0.1:{free_port()}"]}
        relay = Relay(StaticGate(t), connect_timeout=1.0, splice=splice)
        p2 = free_port()
        await relay.start(
            "127.0.0.1", (Listener("smtp", "smtp", port), Listener("pop3", "pop3", p2))
        )
        r, w = await asyncio.open_connection("127.0.0.1", port)
        assert (await read_until(r, b"\n")).startswith(b"421 4.3.0")
        w.close()
        r, w = await asyncio.open_connection("127.0.0.1", p2)
        assert (await read_until(r, b"\n")).startswith(b"+OK")
        w.write(b"USER alice\r\n")
        assert (await read_until(r, b"\n")).startswith(b"-ERR [SYS/TEMP]")
        w.close()
        await relay.stop()

    run(body())


@pytest.mark.parametrize("splice", [False, True])
def test_connection_limit_idle_timeout_and_policy_reload(splice: bool) -> None:
    async def body() -> None:
        loop = asyncio.get_running_loop()
        up_port = free_port()
        upstream = await loop.create_server(Echo, "127.0.0.1", up_port)
        port = free_port()
        gate = StaticGate(table(up_port, port, max_connections=2))
        relay = Relay(gate, connect_timeout=1.0, idle_timeout=1.0, splice=splice)
        await relay.start("127.0.0.1", (Listener("pop3", "pop3", port),))
        conns = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]
        for r, _w in conns[:2]:
            assert await read_until(r, b"\n") == b"HELLO\n"
        r3, w3 = conns[2]
        assert (await read_until(r3, b"\n")).startswith(b"+OK")  # the refusal dialog
        w3.write(b"USER a\r\n")
        assert (await read_until(r3, b"\n")).startswith(b"-ERR [SYS/TEMP]")
        # policy change: pop3 no longer allowed -> open connections closed
        gate.table["users"]["127.0.0.1"]["allow"] = ["smtp"]
        gate.reload()
        for r, _w in conns[:2]:
            assert await asyncio.wait_for(r.read(), 5) == b""
        assert relay.counters[("pop3", "revoked")] == 2
        gate.table["users"]["127.0.0.1"]["allow"] = ["pop3"]
        gate.reload()
        # idle timeout
        r, w = await asyncio.open_connection("127.0.0.1", port)
        assert await read_until(r, b"\n") == b"HELLO\n"
        assert await asyncio.wait_for(r.read(), 5) == b""
        assert relay.counters[("pop3", "idle-timeout")] == 1
        for _r, w in conns:
            w.close()
        await relay.stop()
        upstream.close()

    run(body())


@pytest.mark.parametrize("splice", [False, True])
def test_plain_tcp_service_relays_and_half_closes(splice: bool) -> None:
    async def body() -> None:
        loop = asyncio.get_running_loop()
        up_port = free_port()
        upstream = await loop.create_server(Echo, "127.0.0.1", up_port)
        port = free_port()
        t = table(up_port, port, allow=["bulk"])
        t["servers"]["bulk"] = [f"127.0.0.1:{free_port()}", f"127.0.0.1:{up_port}"]
        gate = StaticGate(t)
        relay = Relay(gate, connect_timeout=1.0, idle_timeout=5.0, splice=splice)
        await relay.start("127.0.0.1", (Listener("bulk", "tcp", port),))
        r0, w0 = await asyncio.open_connection("127.0.0.1", port)
        w0.write(b"early\n")
        w0.write_eof()
        assert await asyncio.wait_for(r0.read(), 5) == b"HELLO\nEARLY\nBYE\n"
        w0.close()
        big = bytes(range(256)) * 40000  # 10 MB through, echoed back upper-cased
        r, w = await asyncio.open_connection("127.0.0.1", port)
        assert await read_until(r, b"\n") == b"HELLO\n"
        w.write(big)
        got = await asyncio.wait_for(r.readexactly(len(big)), 10)
        assert got == big.upper()
        w.close()
        await asyncio.sleep(0.2)
        assert relay.counters[("bulk", "ok")] == 2
        assert not relay.conns
        if splice:
            assert relay.pool.open <= relay.pool.keep  # pipes went back to the pool
        # a user without the right is just closed (tcp has no words for it)
        t["users"]["127.0.0.1"]["allow"] = []
        gate.reload()
        r, w = await asyncio.open_connection("127.0.0.1", port)
        assert await asyncio.wait_for(r.read(), 5) == b""
        w.close()
        await relay.stop()
        upstream.close()

    run(body())


class HeadEcho(asyncio.Protocol):
    """An origin (or web proxy) that answers each request head with the head it received."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t = cast(asyncio.Transport, transport)
        self.buf = b""

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while b"\r\n\r\n" in self.buf:
            head, _, self.buf = self.buf.partition(b"\r\n\r\n")
            self.t.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(head), head))


async def http_get(port: int, raw: bytes, responses: int = 1) -> bytes:
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(raw)
    out = b""
    for _ in range(responses):
        head = await read_until(r, b"\r\n\r\n")
        m = re.search(rb"Content-Length: (\d+)", head)
        body = await asyncio.wait_for(r.readexactly(int(m.group(1))), 5) if m else b""
        out += head + body
    w.close()
    return out


@pytest.mark.parametrize("via_proxy", [True, False])
def test_explicit_http_rewrites_heads_and_keeps_alive(via_proxy: bool) -> None:
    async def body() -> None:
        loop = asyncio.get_running_loop()
        up_port = free_port()
        upstream = await loop.create_server(HeadEcho, "127.0.0.1", up_port)
        port = free_port()
        t = table(up_port, port, allow=["http"], identity="alice")
        t["servers"]["http"] = [f"127.0.0.1:{up_port}"] if via_proxy else []
        gate = StaticGate(t)
        relay = Relay(gate, identity_header="X-Guest-User")
        await relay.start("127.0.0.1", (Listener("http", "http", port, explicit=True),))
        url = f"http://127.0.0.1:{up_port}/a?b=1"
        req = (
            f"GET {url} HTTP/1.1\r\nHost: 127.0.0.1:{up_port}\r\nProxy-Connection: keep-alive\r\n"
            "X-Guest-User: mallory\r\n\r\n"
        ).encode()
        out = await http_get(port, req + req, responses=2)  # pipelined, one connection
        assert out.count(b"HTTP/1.1 200 OK") == 2
        line = f"GET {url if via_proxy else '/a?b=1'} HTTP/1.1".encode()
        assert out.count(line) == 2
        assert b"Proxy-Connection" not in out and b"mallory" not in out
        assert out.count(b"X-Guest-User: alice") == 2
        await asyncio.sleep(0.1)
        assert relay.counters[("http", "ok")] == 1
        # not logged in: 511 for an API client, 302 for a browser
        t["users"] = {}
        gate.reload()
        out = await http_get(port, f"GET {url} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert out.startswith(b"HTTP/1.1 511")
        out = await http_get(
            port, f"GET {url} HTTP/1.1\r\nHost: x\r\nAccept: text/html\r\n\r\n".encode()
        )
        assert out.startswith(b"HTTP/1.1 302") and PORTAL.encode() in out
        await relay.stop()
        upstream.close()

    run(body())


@pytest.mark.parametrize("splice", [False, True])
def test_a_rule_without_max_connections_gets_the_default_cap(splice: bool) -> None:
    """A rule that names no limit is not unlimited: one guest cannot hold every socket."""

    async def body() -> None:
        loop = asyncio.get_running_loop()
        up_port = free_port()
        upstream = await loop.create_server(Echo, "127.0.0.1", up_port)
        port = free_port()
        gate = StaticGate(table(up_port, port))  # alice's rule sets no max_connections
        relay = Relay(gate, splice=splice, max_connections=3)
        await relay.start("127.0.0.1", (Listener("pop3", "pop3", port),))
        conns = [await asyncio.open_connection("127.0.0.1", port) for _ in range(4)]
        for r, _w in conns[:3]:
            assert await read_until(r, b"\n") == b"HELLO\n"
        r4, w4 = conns[3]
        assert (await read_until(r4, b"\n")).startswith(b"+OK")  # the refusal dialog
        w4.write(b"USER a\r\n")
        assert (await read_until(r4, b"\n")).startswith(b"-ERR [SYS/TEMP] too many")
        for _r, w in conns:
            w.close()
        await relay.stop()
        upstream.close()

    run(body())


def test_idle_web_connections_count_against_the_limit() -> None:
    """A web connection counts from its first byte: two idle sockets hold alice's two."""

    async def body() -> None:
        loop = asyncio.get_running_loop()
        up_port = free_port()
        upstream = await loop.create_server(HeadEcho, "127.0.0.1", up_port)
        port = free_port()
        t = table(up_port, port, allow=["http"], max_connections=2)
        t["servers"]["http"] = []
        relay = Relay(StaticGate(t))
        await relay.start("127.0.0.1", (Listener("http", "http", port, explicit=True),))
        idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
        await asyncio.sleep(0.1)
        url = f"http://127.0.0.1:{up_port}/"
        out = await http_get(port, f"GET {url} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert out.startswith(b"HTTP/1.1 429"), out[:60]
        for _r, w in idle:
            w.close()
        await asyncio.sleep(0.1)
        out = await http_get(port, f"GET {url} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert out.startswith(b"HTTP/1.1 200")
        await relay.stop()
        upstream.close()

    run(body())


def test_connection_limits_count_per_user_per_service() -> None:
    async def body() -> None:
        relay = Relay(StaticGate(table(1, 2)), connect_timeout=1.0, idle_timeout=1.0)
        assert relay.count_user("alice", "http", 2) and relay.count_user("alice", "http", 2)
        assert not relay.count_user("alice", "http", 2)  # a third web connection: refused
        assert relay.count_user("alice", "pop3", 2)  # but her mail is another service
        assert relay.count_user("bob", "http", 2)

    run(body())


@pytest.mark.parametrize("via_proxy", [False, True])
def test_hidden_hosts_are_refused_by_name_and_by_odd_numbers(via_proxy: bool) -> None:
    """'localhost', 2130706433 or 0x7f.1 reach 127.0.0.1 as surely as the address does."""

    async def body() -> None:
        loop = asyncio.get_running_loop()
        up_port = free_port()
        upstream = await loop.create_server(HeadEcho, "127.0.0.1", up_port)
        port = free_port()
        t = table(up_port, port, allow=["http"])
        t["servers"]["http"] = [f"127.0.0.1:{up_port}"] if via_proxy else []
        relay = Relay(StaticGate(t), hidden=lambda ip: ip.startswith("127."))
        await relay.start("127.0.0.1", (Listener("http", "http", port, explicit=True),))
        for host, status in (
            ("localhost", b"403"),
            ("127.0.0.1", b"403"),
            ("2130706433", b"400"),
            ("0x7f.1", b"400"),
            ("017700000001", b"400"),
        ):
            req = f"GET http://{host}:{up_port}/ HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
            out = await http_get(port, req)
            assert out.startswith(b"HTTP/1.1 " + status), (host, out[:80])
            assert b"127.0.0.1" not in out
        await relay.stop()
        upstream.close()

    run(body())


class TunnelingProxy(HeadEcho):
    """A web proxy: heads are echoed; after a CONNECT it says 200 and echoes raw bytes."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.tunnel = False

    def data_received(self, data: bytes) -> None:
        if self.tunnel:
            self.t.write(b"echo:" + data)
            return
        if data.startswith(b"CONNECT "):
            self.tunnel = True
            self.t.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            return
        super().data_received(data)


def test_connect_after_a_get_on_one_connection_and_a_revoked_connect_right() -> None:
    async def body() -> None:
        loop = asyncio.get_running_loop()
        up_port = free_port()
        upstream = await loop.create_server(TunnelingProxy, "127.0.0.1", up_port)
        port = free_port()
        t = table(up_port, port, allow=["http", "connect"])
        t["servers"]["http"] = t["servers"]["connect"] = [f"127.0.0.1:{up_port}"]
        gate = StaticGate(t)
        relay = Relay(gate, connect_ports=(443,), resolve=resolver({"example.com": ["192.0.2.80"]}))
        await relay.start("127.0.0.1", (Listener("http", "http", port, explicit=True),))
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(b"GET http://example.com/ HTTP/1.1\r\nHost: example.com\r\n\r\n")
        head = await read_until(r, b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK")
        await asyncio.wait_for(r.readexactly(int(re.findall(rb"Length: (\d+)", head)[0])), 5)
        # a browser reuses its idle proxy connection for a tunnel: the bytes after the
        # CONNECT are the tunnel's (TLS), never parsed as HTTP
        w.write(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n")
        assert (await read_until(r, b"\r\n\r\n")).startswith(b"HTTP/1.1 200 Connection")
        w.write(b"\x16\x03\x01 not http")
        echoed = b"echo:\x16\x03\x01 not http"
        assert await asyncio.wait_for(r.readexactly(len(echoed)), 5) == echoed
        # a plain web connection beside it
        r2, w2 = await asyncio.open_connection("127.0.0.1", port)
        w2.write(b"GET http://example.com/ HTTP/1.1\r\nHost: example.com\r\n\r\n")
        assert (await read_until(r2, b"\r\n\r\n")).startswith(b"HTTP/1.1 200 OK")
        # the admin takes the tunnel right away: the tunnel closes, plain web stays
        t["users"]["127.0.0.1"]["allow"] = ["http"]
        gate.reload()  # the relay re-checks its open connections
        assert await asyncio.wait_for(r.read(), 5) == b""
        await asyncio.sleep(0.1)
        assert not w2.is_closing() and relay.counters[("http", "revoked")] == 1
        w.close()
        w2.close()
        await relay.stop()
        upstream.close()

    run(body())


def test_an_explicit_url_that_does_not_parse_gets_400() -> None:
    async def body() -> None:
        port = free_port()
        t = table(1, port, allow=["http"])
        t["servers"]["http"] = []
        relay = Relay(StaticGate(t))
        await relay.start("127.0.0.1", (Listener("http", "http", port, explicit=True),))
        for url in ("http://a:x/", "http://a:99999/", "http://[::1/"):
            out = await http_get(port, f"GET {url} HTTP/1.1\r\nHost: a\r\n\r\n".encode())
            assert out.startswith(b"HTTP/1.1 400"), (url, out[:60])
        await asyncio.sleep(0.1)
        assert relay.counters[("http", "bad-request-400")] == 3
        await relay.stop()

    run(body())


def test_without_a_site_proxy_plain_requests_go_to_web_ports_only() -> None:
    async def body() -> None:
        port = free_port()
        t = table(1, port, allow=["http"])
        t["servers"]["http"] = []  # no site web proxy: the relay goes direct
        # (loopback: were the rule broken, nothing leaves this machine)
        relay = Relay(StaticGate(t), resolve=resolver({"a.example": ["127.0.0.1"]}))
        await relay.start("127.0.0.1", (Listener("http", "http", port, explicit=True),))
        for target in ("http://a.example:25/", "http://a.example:110/", "http://a.example:22/"):
            out = await http_get(port, f"POST {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            assert out.startswith(b"HTTP/1.1 403"), (target, out[:80])
            assert b"only web ports" in out
        await relay.stop()

    run(body())


def test_heads_two_parsers_could_frame_two_ways_get_400() -> None:
    async def body() -> None:
        port = free_port()
        t = table(1, port, allow=["http"])
        t["servers"]["http"] = []
        relay = Relay(StaticGate(t))
        await relay.start("127.0.0.1", (Listener("http", "http", port, explicit=True),))
        for version, framing in (
            (b"1.1", b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n"),
            (b"1.0", b"Transfer-Encoding: chunked\r\n"),
        ):
            head = b"POST http://a/ HTTP/" + version + b"\r\nHost: a\r\n" + framing + b"\r\n"
            out = await http_get(port, head + b"0\r\n\r\n")
            assert out.startswith(b"HTTP/1.1 400"), (framing, out[:60])
            assert b"Transfer-Encoding" in out, out  # the page says why
        await relay.stop()

    run(body())


def test_a_guest_leaving_mid_refusal_is_counted_once_and_forgotten() -> None:
    """On the raw path the refusal dialog is the relay's own: a guest that hangs up in
    the middle of it, or floods it, leaves no connection behind."""

    async def body() -> None:
        relay, port = await refusing_smtp(splice=True)
        r, w = await asyncio.open_connection("127.0.0.1", port)
        assert (await read_until(r, b"\n")).startswith(b"220")
        w.write(b"EHLO x\r\n")
        assert (await read_until(r, b"\n")).startswith(b"250")
        w.close()  # gone without QUIT
        r2, w2 = await asyncio.open_connection("127.0.0.1", port)
        w2.write(b"\n" * 100_000)  # a flood gets a bounded answer, then the close
        answer = b""
        with contextlib.suppress(ConnectionResetError):  # closed with the flood unread
            while chunk := await asyncio.wait_for(r2.read(65536), 5):
                answer += chunk
        assert len(answer) < 2_000
        w2.close()
        await asyncio.sleep(0.1)
        assert relay.counters[("smtp", "refused-denied")] == 2
        assert not relay.conns and not relay.edges.handlers.keys() - {
            s.fileno() for s in relay.raw_listeners
        }
        await relay.stop()

    run(body())


async def _response(r: asyncio.StreamReader) -> bytes:
    head = await read_until(r, b"\r\n\r\n")
    n = int((re.findall(rb"Content-Length: (\d+)", head) or [b"0"])[0])
    return head + await asyncio.wait_for(r.readexactly(n), 5)


def test_direct_keep_alive_to_a_name_serves_both_requests() -> None:
    async def body() -> None:
        loop = asyncio.get_running_loop()
        up_port = free_port()
        upstream = await loop.create_server(HeadEcho, "127.0.0.1", up_port)
        port = free_port()
        t = table(up_port, port, allow=["http"])
        t["servers"]["http"] = []
        relay = Relay(StaticGate(t), resolve=resolver({"example.com": ["127.0.0.1"]}))
        await relay.start("127.0.0.1", (Listener("http", "http", port, explicit=True),))
        req = f"GET http://example.com:{up_port}/ HTTP/1.1\r\nHost: example.com\r\n\r\n".encode()
        r, w = await asyncio.open_connection("127.0.0.1", port)
        for _ in range(2):
            w.write(req)
            assert (await _response(r)).startswith(b"HTTP/1.1 200")
        w.close()
        await relay.stop()
        upstream.close()

    run(body())


def test_an_idle_web_connection_loses_a_right_the_admin_takes_away() -> None:
    """Counted at connect, it is re-checked on a table change like any open connection,
    and its first request is decided by the tables of that moment."""

    async def body() -> None:
        loop = asyncio.get_running_loop()
        up_port = free_port()
        upstream = await loop.create_server(HeadEcho, "127.0.0.1", up_port)
        port = free_port()
        t = table(up_port, port, allow=["http"])
        t["servers"]["http"] = []
        gate = StaticGate(t)
        relay = Relay(gate)
        await relay.start("127.0.0.1", (Listener("http", "http", port, explicit=True),))
        r, w = await asyncio.open_connection("127.0.0.1", port)
        await asyncio.sleep(0.1)
        t["users"]["127.0.0.1"]["allow"] = []
        gate.reload()
        out = b""
        with contextlib.suppress(ConnectionError):  # aborted by the re-check: a reset
            w.write(f"GET http://127.0.0.1:{up_port}/ HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            out = await asyncio.wait_for(r.read(), 5)
        assert not out.startswith(b"HTTP/1.1 200"), out[:80]
        await asyncio.sleep(0.1)
        assert relay.counts.get("alice", "http") == 0
        w.close()
        await relay.stop()
        upstream.close()

    run(body())


def test_a_count_taken_at_connect_is_given_back_after_a_login_refusal() -> None:
    async def body() -> None:
        port = free_port()
        t = table(1, port, allow=["http", "connect"])
        t["servers"]["http"] = []
        gate = StaticGate(t)
        relay = Relay(gate)
        await relay.start("127.0.0.1", (Listener("http", "http", port, explicit=True),))
        r, w = await asyncio.open_connection("127.0.0.1", port)
        await asyncio.sleep(0.1)
        assert relay.counts.get("alice", "http") == 1
        t["users"] = {}  # the session ends; the connection is still open
        gate.reload()
        w.write(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n")
        with contextlib.suppress(ConnectionError):
            await asyncio.wait_for(r.read(), 5)
        w.close()
        await asyncio.sleep(0.2)
        assert relay.counts.get("alice", "http") == 0 and not relay.conns
        await relay.stop()

    run(body())


class RefusingProxy(asyncio.Protocol):
    """A web proxy that refuses every CONNECT with a framed 403 and keeps the connection."""

    seen: ClassVar[list[bytes]] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        RefusingProxy.seen.append(data)
        if data.startswith(b"CONNECT"):
            self.t.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")


def test_a_tunnel_the_site_proxy_refuses_passes_no_byte_after_it() -> None:
    """The guest's bytes after CONNECT wait for the proxy's 2xx: a proxy that refuses
    and keeps its connection must not get them (they would reach it as unchecked HTTP)."""

    async def body() -> None:
        loop = asyncio.get_running_loop()
        up_port = free_port()
        upstream = await loop.create_server(RefusingProxy, "127.0.0.1", up_port)
        port = free_port()
        t = table(up_port, port, allow=["http", "connect"])
        t["servers"]["http"] = t["servers"]["connect"] = [f"127.0.0.1:{up_port}"]
        relay = Relay(StaticGate(t), resolve=resolver({"example.com": ["192.0.2.80"]}))
        await relay.start("127.0.0.1", (Listener("http", "http", port, explicit=True),))
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(
            b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n"
            b"GET http://198.51.100.3/ HTTP/1.1\r\nHost: 198.51.100.3\r\n\r\n"
        )
        assert (await read_until(r, b"\r\n\r\n")).startswith(b"HTTP/1.1 403")
        assert await asyncio.wait_for(r.read(), 5) == b""  # and closed
        await asyncio.sleep(0.1)
        assert b"198.51.100.3" not in b"".join(RefusingProxy.seen)
        w.close()
        await relay.stop()
        upstream.close()

    run(body())


def test_a_name_with_a_hidden_ipv6_answer_is_refused() -> None:
    """Every answer counts: the site's proxy may connect over IPv6 to an AAAA in a hidden
    prefix though the A record is public."""

    async def body() -> None:
        loop = asyncio.get_running_loop()
        up_port = free_port()
        upstream = await loop.create_server(HeadEcho, "127.0.0.1", up_port)
        port = free_port()
        t = table(up_port, port, allow=["http"])
        t["servers"]["http"] = [f"127.0.0.1:{up_port}"]
        names = {"dual.example": ["192.0.2.80", "2001:db8:51::3"], "v4.example": ["192.0.2.80"]}
        relay = Relay(
            StaticGate(t), resolve=resolver(names), hidden=lambda ip: ip.startswith("2001:db8:51:")
        )
        await relay.start("127.0.0.1", (Listener("http", "http", port, explicit=True),))
        out = await http_get(port, b"GET http://dual.example/ HTTP/1.1\r\nHost: x\r\n\r\n")
        assert out.startswith(b"HTTP/1.1 403"), out[:60]
        out = await http_get(port, b"GET http://v4.example/ HTTP/1.1\r\nHost: x\r\n\r\n")
        assert out.startswith(b"HTTP/1.1 200"), out[:60]
        await relay.stop()
        upstream.close()

    run(body())


@pytest.mark.parametrize("splice", [True, False])
def test_a_silent_refusal_dialog_is_closed_long_before_the_idle_timeout(splice: bool) -> None:
    async def body() -> None:
        port = free_port()
        t = table(1, port, allow=["smtp"])  # pop3 is refused: the dialog answers instead
        relay = Relay(StaticGate(t), idle_timeout=60.0, dialog_timeout=0.5, splice=splice)
        await relay.start("127.0.0.1", (Listener("pop3", "pop3", port),))
        r, w = await asyncio.open_connection("127.0.0.1", port)
        assert (await read_until(r, b"\n")).startswith(b"+OK")
        started = asyncio.get_running_loop().time()
        assert await asyncio.wait_for(r.read(), 5) == b""  # closed, the client said nothing
        assert asyncio.get_running_loop().time() - started < 3
        await asyncio.sleep(0.1)
        results = {r: n for (svc, r), n in relay.counters.items() if svc == "pop3"}
        assert results == {"refused-denied": 1}, results  # counted as the refusal it was
        w.close()
        await relay.stop()

    run(body())
