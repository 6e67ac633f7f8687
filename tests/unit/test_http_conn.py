"""The HTTP path on raw sockets, on loopback: a scripted upstream (the site's web proxy)
that counts its connections and answers in the framings real servers use.  What a guest
checks: every response whole and in order, a cut one never taken as whole; what the site
sees: kept-alive upstream connections reused across requests and across guests."""

from __future__ import annotations

import asyncio
import re
import socket
import struct
from typing import Any

import pytest
from relay_helpers import free_port, loop_kind, resolver, run  # noqa: F401

from appliance.proxy.gate import Listener, StaticGate
from appliance.proxy.relay import Relay

pytestmark = pytest.mark.unit


class Upstream:
    """A web proxy that answers each request by its path:
    /len  200 with Content-Length;   /chunked  200 chunked with a trailer;
    /close  200 without length, then closes;   /head-like: HEAD requests get no body;
    /nocontent 204;   /continue  100 Continue first;   /cut  half a body, then closes;
    /upgrade  101 and then echoes;   /garbage  not HTTP;   /closeafter  answers, then closes
    the idle connection (what a server's keep-alive timeout does)."""

    def __init__(self) -> None:
        self.connections = 0
        self.requests: list[bytes] = []
        self.bound: set[int] = set()  # connections a guest authenticated

    async def serve(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.connections += 1
        me = self.connections
        try:
            while True:
                head = await r.readuntil(b"\r\n\r\n")
                self.requests.append(head)
                line = head.split(b"\r\n", 1)[0]
                method, target = line.split(b" ")[:2]
                path = target.rsplit(b"/", 1)[-1]
                m = re.search(rb"(?i)content-length: (\d+)", head)
                if m and path != b"early":
                    await r.readexactly(int(m.group(1)))
                if path == b"len":
                    body = b"" if method == b"HEAD" else b"0123456789"
                    w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n" + body)
                elif path == b"chunked":
                    w.write(
                        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                        b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n"
                    )
                elif path == b"close":
                    w.write(b"HTTP/1.1 200 OK\r\n\r\nuntil the end")
                    await w.drain()
                    w.close()
                    return
                elif path == b"nocontent":
                    w.write(b"HTTP/1.1 204 No Content\r\n\r\n")
                elif path == b"continue":
                    w.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                    w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                elif path == b"cut":
                    w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly half")
                    await w.drain()
                    w.close()
                    return
                elif path == b"upgrade":
                    w.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: echo\r\n")
                    w.write(b"Connection: upgrade\r\n\r\n")
                    while data := await r.read(4096):
                        w.write(data.upper())
                        await w.drain()
                    w.close()
                    return
                elif path == b"garbage":
                    w.write(b"SSH-2.0-OpenSSH\r\n\r\n")
                elif path == b"early":  # answers before reading the body, keeps the connection
                    w.write(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 4\r\n\r\nnope")
                elif path == b"auth":  # connection-oriented auth: this connection is bound
                    self.bound.add(me)
                    w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi")
                elif path == b"who":
                    who = b"bound" if me in self.bound else b"anon!"
                    w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n" + who)
                elif path == b"strip":  # names its own framing header as hop-by-hop
                    w.write(b"HTTP/1.1 200 OK\r\nConnection: Content-Length\r\n")
                    w.write(b"Content-Length: 3\r\n\r\nabc")
                elif path == b"resetbody":  # a body until close, cut by a reset
                    w.write(b"HTTP/1.1 200 OK\r\n\r\npartial")
                    await w.drain()
                    sock = w.get_extra_info("socket")
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    w.transport.abort()
                    return
                elif path == b"closeafter":
                    w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                    await w.drain()
                    await asyncio.sleep(0.05)
                    w.close()
                    return
                await w.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            w.close()


def http_table(port: int, up_port: int) -> dict[str, Any]:
    return {
        "portal_url": "http://192.168.1.1/",
        "listeners": [{"service": "http", "protocol": "http", "port": port, "explicit": True}],
        "servers": {"http": [f"127.0.0.1:{up_port}"]},
        "users": {"127.0.0.1": {"user": "alice", "rule": "staff", "allow": ["http"]}},
    }


async def setup() -> tuple[Relay, Upstream, asyncio.Server, int]:
    up = Upstream()
    up_port = free_port()
    server = await asyncio.start_server(up.serve, "127.0.0.1", up_port)
    port = free_port()
    relay = Relay(StaticGate(http_table(port, up_port)), connect_timeout=1.0)
    await relay.start("127.0.0.1", (Listener("http", "http", port, explicit=True),))
    return relay, up, server, port


def request(path: str, method: str = "GET", extra: str = "", body: bytes = b"") -> bytes:
    head = f"{method} http://192.0.2.80/{path} HTTP/1.1\r\nHost: 192.0.2.80\r\n{extra}"
    if body:
        head += f"Content-Length: {len(body)}\r\n"
    return head.encode() + b"\r\n" + body


async def exchange(port: int, data: bytes, until: bytes | None = None) -> bytes:
    """Send, then read until `until` appears (or the relay closes)."""
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(data)
    out = b""
    while until is None or until not in out:
        chunk = await asyncio.wait_for(r.read(65536), 5)
        if not chunk:
            break
        out += chunk
    w.close()
    return out


def test_upstream_connections_are_reused_across_requests_and_guests() -> None:
    async def body() -> None:
        relay, up, server, port = await setup()
        # a page of three objects, pipelined, then two more guests one after another
        last = b"X-Trailer: t\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n0123456789"
        out = await exchange(port, request("len") + request("chunked") + request("len"), last)
        assert out.count(b"HTTP/1.1 200 OK") == 3
        assert b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n" in out
        for _ in range(2):
            out = await exchange(port, request("len", extra="Connection: close\r\n"))
            assert out.endswith(b"0123456789")  # and the relay closed the guest's side
            # the guest is told its connection closes, whatever the upstream's stays
            assert b"\r\nConnection: close\r\n" in out
        assert up.connections == 1 and len(up.requests) == 5  # one upstream connection
        assert relay.upstreams.reused == 4
        # the guest's Connection: close is the guest's: never forwarded to the proxy
        assert not any(b"onnection: close" in r for r in up.requests)
        await relay.stop()
        server.close()

    run(body())


def test_framings_without_a_body_and_interim_answers() -> None:
    async def body() -> None:
        relay, up, server, port = await setup()
        reqs = request("len", "HEAD") + request("nocontent") + request("continue", body=b"abc")
        out = await exchange(port, reqs + request("len"), b"0123456789")
        heads = re.findall(rb"HTTP/1.1 (\d{3})", out)
        assert heads == [b"200", b"204", b"100", b"200", b"200"]
        assert out.endswith(b"ok" + b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n0123456789")
        assert up.connections == 1
        await relay.stop()
        server.close()

    run(body())


def test_a_body_until_close_ends_both_connections_and_is_not_pooled() -> None:
    async def body() -> None:
        relay, _up, server, port = await setup()
        out = await exchange(port, request("close") + request("len"))
        assert out.endswith(b"until the end")  # the second request is never answered
        assert relay.upstreams.idle_conns.get(
            ("127.0.0.1", server.sockets[0].getsockname()[1])
        ) in (None, [])
        await relay.stop()
        server.close()

    run(body())


def test_a_pooled_connection_the_server_closed_is_retried_once_on_a_new_one() -> None:
    async def body() -> None:
        relay, up, server, port = await setup()
        assert (await exchange(port, request("closeafter"), b"\r\n\r\nok")).endswith(b"ok")
        await asyncio.sleep(0.2)  # the server closed the idle connection meanwhile
        assert (await exchange(port, request("len"), b"0123456789")).endswith(b"0123456789")
        assert up.connections == 2
        # closed just as it is taken (no time to notice): the request goes again, once
        pool = relay.upstreams
        sock = pool.take(next(iter(pool.idle_conns)))
        assert sock is not None
        sock.shutdown(2)  # (as if the server's FIN crossed our request)
        taken = [sock]
        pool.take = lambda key, check=True: taken.pop() if taken else None  # type: ignore[method-assign]
        assert (await exchange(port, request("len"), b"0123456789")).endswith(b"0123456789")
        assert not taken and up.connections == 3
        await relay.stop()
        server.close()

    run(body())


def test_a_cut_or_bad_answer_is_never_passed_on_as_whole() -> None:
    async def body() -> None:
        relay, _up, server, port = await setup()
        with pytest.raises(ConnectionResetError):  # a cut answer ends with a reset
            await exchange(port, request("cut"))
        await asyncio.sleep(0.05)
        assert relay.counters[("http", "upstream-reset")] == 1
        out = await exchange(port, request("garbage"))
        assert out.startswith(b"HTTP/1.1 502 Bad Gateway")
        await relay.stop()
        server.close()

    run(body())


def test_an_accepted_upgrade_becomes_a_tunnel() -> None:
    async def body() -> None:
        relay, up, server, port = await setup()
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(request("upgrade", extra="Connection: Upgrade\r\nUpgrade: echo\r\n"))
        head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 101")
        w.write(b"ping")
        assert await asyncio.wait_for(r.readexactly(4), 5) == b"PING"
        w.close()
        assert b"Upgrade: echo" in up.requests[0] and b"Connection: upgrade" in up.requests[0]
        await relay.stop()
        server.close()

    run(body())


def test_connect_is_for_the_explicit_port_only() -> None:
    """On the transparent port a CONNECT would reach any name on any port past the
    rules (issue #16 review): it is answered 405, never tunnelled."""

    async def body() -> None:
        relay, up, server, _port = await setup()
        port = free_port()
        await relay.start("127.0.0.1", (Listener("http", "http", port),))
        relay.original = lambda _sock: ("192.0.2.80", 80)
        out = await exchange(port, b"CONNECT www.example.com:443 HTTP/1.1\r\nHost: x\r\n\r\n")
        assert out.startswith(b"HTTP/1.1 405"), out
        assert up.connections == 0
        await relay.stop()
        server.close()

    run(body())


def test_an_answer_before_the_body_ends_still_ends_the_cycle() -> None:
    async def body() -> None:
        relay, _up, server, port = await setup()
        r, w = await asyncio.open_connection("127.0.0.1", port)
        head = request("early", "POST", "Content-Length: 10\r\n")
        w.write(head + b"01234")  # half the body; the answer comes already
        assert (await asyncio.wait_for(r.readuntil(b"nope"), 5)).startswith(b"HTTP/1.1 401")
        w.write(b"56789" + request("len"))  # the rest, then the next request
        assert (await asyncio.wait_for(r.readuntil(b"0123456789"), 5)).endswith(b"0123456789")
        w.close()
        await relay.stop()
        server.close()

    run(body())


def test_a_connection_a_guest_authenticated_is_never_anothers() -> None:
    async def body() -> None:
        relay, up, server, port = await setup()
        auth = "Authorization: NTLM TlRMTVNTUAABAAAA\r\n"
        assert (await exchange(port, request("auth", extra=auth), b"hi")).endswith(b"hi")
        out = await exchange(port, request("who"), b"!")
        assert out.endswith(b"anon!"), out  # another guest: a fresh upstream connection
        assert up.connections == 2
        await relay.stop()
        server.close()

    run(body())


def test_an_upstream_cannot_strip_the_framing_or_pass_a_reset_as_an_end() -> None:
    async def body() -> None:
        relay, _up, server, port = await setup()
        out = await exchange(port, request("strip"), b"abc")
        assert b"Content-Length: 3\r\n" in out and out.endswith(b"abc")
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(request("resetbody"))
        got = b""
        with pytest.raises(ConnectionResetError):  # a cut answer, never a clean end
            while chunk := await asyncio.wait_for(r.read(65536), 5):
                got += chunk
        assert got.endswith(b"partial")
        w.close()
        await asyncio.sleep(0.05)
        assert relay.counters[("http", "upstream-reset")] == 1
        await relay.stop()
        server.close()

    run(body())


def test_idle_upstreams_are_bounded_in_all() -> None:
    async def body() -> None:
        relay, _up, server, _ = await setup()
        pool = relay.upstreams
        pool.keep_total = 3
        a, b = socket.socketpair()
        others = []
        for i in range(5):  # five upstreams, one idle connection each
            x, y = socket.socketpair()
            others.append(y)
            relay.edges.watch(x.fileno(), lambda _ev: None)
            pool.put((f"192.0.2.{i}", 80), x)
        assert pool.size() == 3
        assert set(pool.idle_conns) >= {("192.0.2.3", 80), ("192.0.2.4", 80)}
        a.close()
        b.close()
        await relay.stop()
        server.close()

    run(body())


def test_a_web_proxy_given_by_name_is_pooled_by_its_address() -> None:
    """The site's proxy by host name ('localhost'): resolved for each request, and the
    request goes on a kept-alive connection to the address it resolved to; a guest's name
    in a hidden network is refused all the same."""

    async def body() -> None:
        up = Upstream()
        up_port = free_port()
        server = await asyncio.start_server(up.serve, "127.0.0.1", up_port)
        port = free_port()
        t = http_table(port, up_port)
        t["servers"]["http"] = [f"localhost:{up_port}"]
        names = {"intranet.example": ["10.9.0.7"]}
        relay = Relay(
            StaticGate(t),
            connect_timeout=1.0,
            resolve=resolver(names),
            hidden=lambda ip: ip.startswith("10.9."),
        )
        await relay.start("127.0.0.1", (Listener("http", "http", port, explicit=True),))
        two = request("len") + request("len", extra="Connection: close\r\n")
        out = await exchange(port, two)
        assert out.count(b"HTTP/1.1 200 OK") == 2 and out.endswith(b"0123456789")
        assert up.connections == 1 and len(up.requests) == 2  # one upstream connection
        assert relay.upstreams.reused == 1
        hidden = b"GET http://intranet.example/len HTTP/1.1\r\nHost: intranet.example\r\n\r\n"
        out = await exchange(port, request("len") + hidden)
        assert out.count(b"HTTP/1.1 200 OK") == 1 and b"HTTP/1.1 403" in out
        assert len(up.requests) == 3  # the hidden name never reached the proxy
        await relay.stop()
        server.close()

    run(body())


def test_a_slow_guest_is_served_whenever_its_bytes_come() -> None:
    """A head that comes late and in pieces, a body after it, and a second request long
    after the first answer: each is read when it comes (the relay reads a new guest's
    request at once, and waits for the guest's socket only when it must)."""

    async def body() -> None:
        relay, up, server, port = await setup()
        r, w = await asyncio.open_connection("127.0.0.1", port)
        first = request("len", method="POST", body=b"12345")
        head, rest = first.split(b"\r\n\r\n", 1)
        for piece in (b"", head[:10], head[10:] + b"\r\n\r\n", rest):
            await asyncio.sleep(0.05)
            w.write(piece)
        out = await asyncio.wait_for(r.readuntil(b"0123456789"), 5)
        assert out.startswith(b"HTTP/1.1 200 OK")
        await asyncio.sleep(0.1)  # idle between requests, the connection kept
        w.write(request("chunked"))
        out = await asyncio.wait_for(r.readuntil(b"X-Trailer: t\r\n\r\n"), 5)
        assert out.startswith(b"HTTP/1.1 200 OK")
        w.close()
        # the head in the socket before the relay accepts it, its body later
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(head + b"\r\n\r\n")
        r, w = await asyncio.open_connection(sock=s)
        await asyncio.sleep(0.1)
        w.write(rest)
        out = await asyncio.wait_for(r.readuntil(b"0123456789"), 5)
        assert out.startswith(b"HTTP/1.1 200 OK")
        w.close()
        assert len(up.requests) == 3 and up.requests[2].startswith(b"POST ")
        await relay.stop()
        server.close()

    run(body())
