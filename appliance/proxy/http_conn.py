"""HTTP on raw sockets: the transparent port 80 and the explicit proxy port (with CONNECT).

One guest connection, request by request.  The head is parsed (http_framing,
sans-IO), its destination checked by one grammar (http_target) and the gate
asked again (the tables may have changed since the last request); the head sent
on is rebuilt from what was checked, never passed through: absolute-form to the
site's web proxy, origin-form when going direct, hop-by-hop headers and any
guest-sent identity header dropped, the identity header added when configured.
It goes out on a kept-alive connection to that upstream from the pool
(upstream_pool.py), or a new one.  The response comes back unchanged while its
framing is counted; once it is complete the upstream connection returns to the
pool, and the guest's next request (maybe already read: pipelining) is served.
CONNECT, and an upgrade the server accepts (101), make the connection a tunnel
(splice.py).  Targets in a hidden network are refused: a guest never reaches the
segment through us.

Flow control: bytes read from one side wait in at most one buffer (`to_up`,
`to_guest`) until the other side took them; while one waits, the side it came
from is not read.  Readiness is what the edge-triggered epoll last said, cleared
by EAGAIN, as in splice.py.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import struct

from appliance.core.config import STAND_IN_TEXT as STAND_IN
from appliance.proxy.gate import (
    NO_SUCH_HOST,
    Admission,
    Listener,
    Refusal,
    Upstream,
    no_upstream,
)
from appliance.proxy.http_framing import (
    BadMessage,
    BodyFraming,
    RequestHead,
    ResponseHead,
    parse_request_head,
    parse_response_head,
)
from appliance.proxy.http_target import (
    BadTarget,
    connect_target,
    explicit_target,
    transparent_target,
    web_port,
)
from appliance.proxy.raw import Connector, RawRelay, Spliced, connect, numeric
from appliance.proxy.refusals import http_refusal
from appliance.proxy.splice import READ, READ_ON, WRITE, Sock, SpliceConn
from appliance.proxy.tunnel import MAX_HEAD, TunnelAnswer, connect_request
from appliance.proxy.upstream_pool import Key

log = logging.getLogger("appliance.proxy.http")

READ_SIZE = 65536
ROUNDS = 16  # steps per event before yielding to other connections
# never forwarded: Host is rebuilt from the checked target; the rest are hop-by-hop
# (RFC 9110 7.6.1), answered or kept by us, not by the guest's word
_DROPPED = frozenset(
    {b"host", b"connection", b"proxy-connection", b"keep-alive", b"te", b"trailer", b"upgrade"}
)
_CUT = frozenset({"upstream-reset", "bad-response"})
_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends a reset
_RESPONSE_HOP = frozenset({b"connection", b"keep-alive", b"proxy-connection"})
# what the relay counts the body by: never dropped, whatever Connection names
_FRAMING = frozenset({b"content-length", b"transfer-encoding"})
_IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
ESTABLISHED = b"HTTP/1.1 200 Connection established\r\n\r\n"

# phases of a request cycle
HEAD, WAIT, EXCHANGE, CLOSING = range(4)


def _guest_head(data: bytes, head: ResponseHead, keep: bool, version: bytes) -> bytes:
    """The response head the guest gets: the upstream's, with its hop-by-hop headers
    (RFC 9110 7.6.1) replaced by what holds between the guest and us: the upstream
    connection's fate is ours, the guest's connection stays open or is closed as said."""
    named = {t.strip().lower() for _n, v in head.headers if _n.lower() == b"connection"
             for t in v.split(b",")} - _FRAMING  # fmt: skip
    lines = [data[: data.find(b"\r\n")]]
    for name, value in head.headers:
        low = name.lower()
        if low in _RESPONSE_HOP or low in named:
            continue
        lines.append(name + b": " + value)
    if not keep:
        lines.append(b"Connection: close")
    elif version == b"1.0":
        lines.append(b"Connection: keep-alive")
    return b"\r\n".join(lines) + b"\r\n\r\n"


def _poolable(req: RequestHead, resp: ResponseHead) -> bool:
    """May another guest's request use this upstream connection next?  Not when the
    exchange may have bound it to this guest (connection-oriented authentication:
    NTLM and Negotiate authenticate the connection, not the request), nor when the
    guest spoke HTTP/1.0 (the server then means to close)."""
    if req.version != b"1.1" or resp.status in (401, 407):
        return False
    return req.header(b"authorization") is None and req.header(b"proxy-authorization") is None


def _ports(ports: frozenset[int]) -> str:
    return ", ".join(str(p) for p in sorted(ports))


class HttpConn(Spliced):
    """One guest HTTP connection on raw sockets."""

    __slots__ = (
        "c_read_on",
        "c_readable",
        "c_watched",
        "c_writable",
        "candidates",
        "fresh",
        "guest_eof",
        "had_body",
        "inbuf",
        "keep",
        "limited",
        "orig",
        "phase",
        "req",
        "req_body",
        "resp",
        "resp_body",
        "resp_buf",
        "reused",
        "sent_head",
        "to_guest",
        "to_up",
        "u_read_on",
        "u_readable",
        "u_writable",
        "up",
        "up_key",
        "wants_html",
    )

    def __init__(self, relay: RawRelay, listener: Listener, sock: Sock, src: str) -> None:
        super().__init__(relay, listener, sock, src)
        self.inbuf = bytearray()
        self.to_guest = b""
        self.to_up = b""
        self.c_readable = self.u_readable = False
        self.c_read_on = self.u_read_on = False  # the last edge said: read until EAGAIN
        self.c_writable = self.u_writable = True
        self.c_watched = False  # the guest's socket is in the epoll (from its first wait on)
        self.guest_eof = False
        self.had_body = False
        self.keep = False  # the guest keeps its connection after this request
        self.fresh = -1  # admitted at accept under this table generation (-1: ask again)
        self.phase = HEAD
        self.req: RequestHead | None = None
        self.req_body = BodyFraming.none()
        self.resp: ResponseHead | None = None
        self.resp_body = BodyFraming.none()
        self.resp_buf = b""
        self.sent_head = b""
        self.up: Sock | None = None
        self.up_key: Key | None = None
        self.reused = False
        self.candidates: tuple[Upstream, ...] = ()
        self.limited: Admission | None = None
        self.orig: tuple[str, int] | None = None
        self.wants_html = False

    def start(self) -> None:
        """Accepted: a logged-in guest's connection counts from its first byte, not its
        first request (idle sockets are how one guest would hold them all)."""
        if not self.listener.explicit:
            self.orig = self.owner.original(self.sock)
        verdict = self.owner.gate.admit(self.src, self.listener.service)
        if isinstance(verdict, Admission):
            if self.admitted(verdict):
                self.adm = verdict
                self.fresh = self.owner.generation  # its first request needs no new answer
            else:
                self.limited = verdict
        # the request is most often in the socket already: read it now, and put the socket
        # in the epoll only once an edge of it is awaited (`_wait`); a guest whose one
        # request is answered at once never costs a registration (nor its edge's event)
        self.c_readable = True
        self._run()

    def activity(self) -> int:
        if self.conn is not None:
            return super().activity()
        return self.bytes_up + self.bytes_down

    def connecting(self) -> bool:
        """Admitted and not a tunnel: a table change must reach it (every request is
        checked again anyway)."""
        return self.adm is not None and self.conn is None and not self.closed

    # -- events --------------------------------------------------------------------
    def _client_event(self, ev: int) -> None:
        if ev & READ:
            self.c_readable = True
            self.c_read_on = bool(ev & READ_ON)
        if ev & WRITE:
            self.c_writable = True
        self._run()

    def _up_event(self, ev: int) -> None:
        if ev & READ:
            self.u_readable = True
            self.u_read_on = bool(ev & READ_ON)
        if ev & WRITE:
            self.u_writable = True
        self._run()

    def _run(self) -> None:
        for _ in range(ROUNDS):
            if self.closed or self.conn is not None:
                return
            if not self._step():
                if not (self.c_watched or self.closed or self.conn is not None):
                    self._wait()
                return
        self.edges.soon(self._run)  # rounds used up: others first

    def _wait(self) -> None:
        """Nothing can move: an edge is awaited.  The guest's socket joins the epoll the
        first time one of its edges is (an edge-triggered registration reports at once
        what is already pending), not while only the upstream's answer is awaited."""
        if self.phase in (WAIT, EXCHANGE) and self.req_body.done and not self.to_guest:
            return
        self.c_watched = True
        self.edges.watch(self.sock.fileno(), self._client_event)

    def _step(self) -> bool:
        """One step of whatever can move now; False: nothing could (wait for an edge)."""
        moved = False
        if self.to_up and self.u_writable and self.up is not None:
            moved = self._write_up()
        if self.to_guest and self.c_writable:
            moved = self._write_guest() or moved
        if self.closed:
            return False
        phase = self.phase
        if phase == CLOSING:
            if not self.to_guest:
                self._close("ok")
            return False
        if phase == HEAD:
            return self._head() or moved
        if phase == EXCHANGE:
            if not self.req_body.done and not self.to_up:
                moved = self._request_body() or moved
            if not self.to_guest and self.up is not None:
                moved = self._response() or moved
        return moved

    # -- the guest side ------------------------------------------------------------
    def _read_guest(self) -> bool:
        if not self.c_readable or self.guest_eof:
            return False
        try:
            data = self.sock.recv(READ_SIZE)
        except BlockingIOError:
            self.c_readable = False
            return False
        except OSError:
            self.abort("reset")
            return False
        if not data:
            self.guest_eof = True
            return True
        if len(data) < READ_SIZE and not self.c_read_on:
            # the receive queue is empty: wait for an edge (unless the last one said the
            # peer hung up: the EOF is still to read, and no edge will come for it)
            self.c_readable = False
        self.inbuf += data
        return True

    def _write_guest(self) -> bool:
        try:
            n = self.sock.send(self.to_guest)
        except BlockingIOError:
            self.c_writable = False
            return False
        except OSError:
            self.abort("reset")
            return False
        self.bytes_down += n
        self.to_guest = self.to_guest[n:]
        if self.to_guest:
            self.c_writable = False
        return True

    def _head(self) -> bool:
        if self.to_guest:
            return False  # the last answer first: a tunnel that follows starts after it
        try:
            head = parse_request_head(self.inbuf) if self.inbuf else None
        except BadMessage as exc:
            self._fail(exc.status, str(exc))
            return True
        if head is None:
            if self.guest_eof:
                self._close("ok")  # (a guest that closes between requests: normal)
                return False
            return self._read_guest()
        del self.inbuf[: head.size]
        self.req = head
        self._request(head)
        return True

    def _request_body(self) -> bool:
        if not self.inbuf:
            if self.guest_eof:
                self.abort("client-gone")  # a request body cut short
                return False
            return self._read_guest()
        try:
            n = self.req_body.feed(self.inbuf)
        except BadMessage as exc:
            self.reason = str(exc)
            self.abort("bad-request")
            return False
        if n:
            self.to_up += bytes(self.inbuf[:n])
            del self.inbuf[:n]
        if self.req_body.done and self.resp is not None and self.resp_body.done:
            self._cycle_done()  # the answer came before the body's end (a 401, a 413)
        return n > 0

    # -- one request ---------------------------------------------------------------
    def _request(self, head: RequestHead) -> None:
        connect = head.method == "CONNECT"
        if connect and not self.listener.explicit:
            # a tunnel on the transparent port would reach any name on any port past the
            # rules (the tls services decide port 443 by the ClientHello)
            self._answer(405, "Method Not Allowed", "CONNECT is for the explicit proxy port")
            return
        service = "connect" if connect else self.listener.service
        self.wants_html = b"text/html" in (head.header(b"accept") or b"")
        if self.limited is not None:
            self.refuse_now(self.limit_refusal(self.limited))
            return
        fresh = self.adm if self.fresh == self.owner.generation else None
        self.fresh = -1
        if fresh is not None and service == self.listener.service:
            verdict: Admission | Refusal = fresh  # asked at accept, tables unchanged since
        else:
            verdict = self.owner.gate.admit(self.src, service)
        if isinstance(verdict, Refusal):
            self.refuse_now(verdict)
            return
        if not self.admitted(verdict):  # counts once per connection
            self.refuse_now(self.limit_refusal(verdict))
            return
        self.adm = verdict
        self.right = service  # a tunnel holds the `connect` right, not `http`
        try:
            self.req_body = head.body()
            if connect:
                req = connect_target(head.target)
            elif self.listener.explicit:
                req = explicit_target(head.target)
            elif self.orig is None:
                raise BadTarget("no original destination")
            else:
                hosts = [v.decode("latin-1") for k, v in head.headers if k.lower() == b"host"]
                req = transparent_target(head.target, hosts, self.orig)
        except (BadMessage, BadTarget) as exc:
            self._fail(getattr(exc, "status", 400), str(exc))
            return
        checked = req.dest
        if connect and checked.port not in self.owner.connect_ports:
            # a tunnel to any port would be a way around every other service's rule
            reason = f"CONNECT is allowed to port {_ports(self.owner.connect_ports)} only"
            self.refuse_now(Refusal("denied", reason, "", verdict.user, verdict.rule))
            return
        if not connect and not verdict.upstreams and not web_port(checked.port):
            # relayed by us, not by a site proxy with its own rules: web ports only
            reason = f"a web request to port {checked.port}: only web ports are relayed"
            self.refuse_now(Refusal("denied", reason, "", verdict.user, verdict.rule))
            return
        hidden = self.owner.hidden
        if (checked.numeric and (checked.host == STAND_IN or hidden(checked.host))) or (
            # the DNS stand-in a guest may still have cached from before its login is no
            # destination: the checked Host is
            self.orig is not None and self.orig[0] != STAND_IN and hidden(self.orig[0])
        ):
            self._refuse_hidden()
            return
        host, port = checked.host, checked.port
        self.asked = host
        proxies = verdict.upstreams
        self.candidates = proxies or (Upstream("direct", host, port),)
        if connect:
            self.tunnel_to = (host, port) if proxies else None
            self.sent_head = b""
        else:
            target = req.absolute() if proxies else req.path
            self.sent_head = self._rebuild(head, target, checked.authority(80), verdict)
        self.had_body = not self.req_body.done
        self.keep = head.keep_alive()
        self.phase = WAIT
        if checked.numeric:
            self._go()
        else:
            self.owner.loop.create_task(self._check_then_go(host, port))

    def _rebuild(self, head: RequestHead, target: str, authority: str, adm: Admission) -> bytes:
        """The head we send on: request line and Host from the checked target."""
        ident = self.owner.identity_header
        # (X_Guest_User is X-Guest-User to a CGI or WSGI server: dropped too)
        ident_l = ident.lower().replace("_", "-").encode() if ident else b""
        lines = [f"{head.method} {target} HTTP/{head.version.decode()}".encode()]
        lines.append(b"Host: " + authority.encode())
        upgrade = head.upgrade()
        for name, value in head.headers:
            low = name.lower()
            if low in _DROPPED or (ident and low.replace(b"_", b"-") == ident_l):
                if upgrade and low == b"upgrade":
                    lines.append(name + b": " + value)
                continue
            lines.append(name + b": " + value)
        if upgrade:
            lines.append(b"Connection: upgrade")
        if ident and adm.identity:
            lines.append(f"{ident}: {adm.identity}".encode())
        return b"\r\n".join(lines) + b"\r\n\r\n"

    async def _check_then_go(self, name: str, port: int) -> None:
        """The site resolver's answers for the name, every one: a name of a hidden host
        is refused even though the proxy would fetch it, and so is one that does not
        resolve (fail closed: the proxy's answer could differ from ours)."""
        addresses = await self.owner.check_name(name, port)
        if self.closed:
            return
        adm = self.adm
        assert adm is not None
        if addresses is None:
            self.refuse_now(Refusal("unavailable", NO_SUCH_HOST, "", adm.user, adm.rule))
        elif any(self.owner.hidden(a) for a in addresses):
            self._refuse_hidden()
        else:
            ipv4 = next((a for a in addresses if ":" not in a), None)
            if self.candidates[0].name == "direct":
                if ipv4 is None:
                    self.refuse_now(Refusal("unavailable", NO_SUCH_HOST, "", adm.user, adm.rule))
                    return
                # connect to the address we checked, not to a second lookup's answer
                self.candidates = (Upstream("direct", ipv4, self.candidates[0].port),)
            self._go()

    def _go(self) -> None:
        """Send the request: on a pooled connection when there is one, else connect."""
        if self.closed:
            return
        cands = self.candidates
        if not self.sent_head:  # a tunnel always gets its own connection
            self._connect_new()
        elif numeric(cands):
            if not self._take_pooled(cands[0]):
                self._connect_new()
        else:  # the proxy by name: resolved for this request, then the address's pool
            self.owner.loop.create_task(self._resolve_then_go(cands))

    async def _resolve_then_go(self, cands: tuple[Upstream, ...]) -> None:
        tries = await self.owner.resolve_upstreams(self.listener.service, cands)
        if self.closed:
            return
        if tries.ups and self._take_pooled(tries.ups[0]):  # (the first that resolved)
            return
        Connector(self.owner, self, tries).next()

    def _take_pooled(self, up: Upstream) -> bool:
        """The request on a kept-alive connection to this address, if the pool has one."""
        key = (up.host, up.port)
        req = self.req
        retryable = req is not None and req.method in _IDEMPOTENT and not self.had_body
        sock = self.owner.upstreams.take(key, check=not retryable)
        if sock is None:
            return False
        self.upstream_name = up.name
        self._attach(sock, key, reused=True)
        return True

    def _connect_new(self) -> None:
        connect(self.owner, self, self.candidates)  # (the proxy by name: resolved first)

    def connected(self, up: Sock, events: int, upstream: Upstream) -> None:
        if self.sent_head:
            self._attach(up, (upstream.host, upstream.port), reused=False)
            return
        if self.tunnel_to is not None:  # CONNECT through the site's proxy
            self._ask_tunnel(up)
            return
        # CONNECT direct: the guest hears "established" from us
        first_up = bytes(self.inbuf)
        self.inbuf.clear()
        self.conn = SpliceConn(
            self.edges, self.owner.pool, self.sock, up, self.ended, events, first_up, ESTABLISHED
        )

    def _attach(self, sock: Sock, key: Key, reused: bool) -> None:
        self.up, self.up_key, self.reused = sock, key, reused
        self.edges.rehandle(sock.fileno(), self._up_event)
        self.u_readable, self.u_writable, self.u_read_on = False, True, False
        self.resp, self.resp_buf, self.resp_body = None, b"", BodyFraming.none()
        self.to_up = self.sent_head
        self.phase = EXCHANGE
        self._run()

    # -- the upstream side ---------------------------------------------------------
    def _write_up(self) -> bool:
        up = self.up
        assert up is not None
        try:
            n = up.send(self.to_up)
        except BlockingIOError:
            self.u_writable = False
            return False
        except OSError:
            self._upstream_gone()
            return False
        self.bytes_up += n
        self.to_up = self.to_up[n:]
        if self.to_up:
            self.u_writable = False
        return True

    def _response(self) -> bool:
        up = self.up
        if not self.u_readable or up is None:
            return False
        try:
            data = up.recv(READ_SIZE)
        except BlockingIOError:
            self.u_readable = False
            return False
        except OSError:  # a reset: never an end, even of a body that ends with the close
            self._upstream_gone()
            return True
        if not data:
            self._upstream_eof()
            return True
        if len(data) < READ_SIZE and not self.u_read_on:
            self.u_readable = False
        if self.resp is None:
            self._response_head(self.resp_buf + data)
        else:
            self._response_body(data)
        return True

    def _response_head(self, data: bytes) -> None:
        req = self.req
        assert req is not None
        while True:
            try:
                head = parse_response_head(data)
            except BadMessage as exc:
                self._bad_upstream(str(exc))
                return
            if head is None:
                if len(data) > MAX_HEAD * 4:
                    self._bad_upstream("response head too long")
                    return
                self.resp_buf = data
                return
            if 100 <= head.status < 200 and head.status != 101:
                if req.version == b"1.1":  # (a 1.0 client knows no interim answers)
                    self.to_guest += data[: head.size]  # 100 Continue and friends
                data = data[head.size :]
                continue
            break
        self.resp, self.resp_buf = head, b""
        if head.status == 101:
            if req.upgrade():
                self._tunnel_after(data[: head.size], data[head.size :])
            else:
                self._bad_upstream("switching protocols nobody asked for")
            return
        try:
            self.resp_body = head.body(req.method)
        except BadMessage as exc:
            self._bad_upstream(str(exc))
            return
        keep = self.keep and not self.resp_body.until_close and not self.guest_eof
        self.to_guest += _guest_head(data, head, keep, req.version)
        self._response_body(data[head.size :])

    def _response_body(self, data: bytes) -> None:
        body = self.resp_body
        if data:
            try:
                n = body.feed(data)
            except BadMessage as exc:
                self._bad_upstream(str(exc))
                return
            self.to_guest += data[:n] if n < len(data) else data
            if n < len(data):  # bytes after the response: the upstream is not reusable
                self.reused = False
                self._drop_upstream()
        if body.done and self.req_body.done:
            self._cycle_done()

    def _cycle_done(self) -> None:
        """The response is complete: its upstream back to the pool (when both ends keep
        it), and the guest's next request, or the end."""
        req, resp = self.req, self.resp
        assert req is not None and resp is not None
        if self.up is not None and self.up_key is not None:
            if resp.keep_alive() and not self.to_up and _poolable(req, resp):
                self.owner.upstreams.put(self.up_key, self.up)
                self.up = None
            else:
                self._drop_upstream()
        self.req = None
        if self.keep and not self.resp_body.until_close and not self.guest_eof:
            self.phase = HEAD
            self.req_body = BodyFraming.none()
        else:
            self.phase = CLOSING

    def _upstream_eof(self) -> None:
        if self.resp is not None and self.resp_body.until_close:
            self._drop_upstream()
            self.phase = CLOSING  # the body ended with the connection: so does the guest's
            return
        self._upstream_gone()

    def _upstream_gone(self) -> None:
        """The upstream closed or failed before the response was complete."""
        req = self.req
        self._drop_upstream()
        if (
            self.resp is None
            and not self.resp_buf
            and self.reused
            and req is not None
            and req.method in _IDEMPOTENT
            and not self.had_body
        ):
            # a pooled connection the server had just closed: once more, on a new one
            # (RFC 9112 9.3.1); the request has no body, so it can be sent again whole
            log.debug("pooled upstream closed before answering; retrying on a new one")
            self.reused = False
            self.phase = WAIT
            self._connect_new()
            return
        if self.resp is None:
            self.refuse_now(no_upstream(self.user, self.rule))
        else:
            self.abort("upstream-reset")  # the guest must not take a cut answer as whole

    def _bad_upstream(self, why: str) -> None:
        log.info("bad answer from %s: %s", self.upstream_name, why)
        self.reason = why
        self._drop_upstream()
        if self.resp is None:
            self._answer(502, "Bad Gateway", "the upstream's answer was not HTTP")
        else:
            self.abort("bad-response")

    def _drop_upstream(self) -> None:
        if self.up is not None:
            self.edges.close(self.up)
            self.up = None

    # -- tunnels -------------------------------------------------------------------
    def _tunnel_after(self, head: bytes, rest: bytes) -> None:
        """101 Switching Protocols to an upgrade the guest asked for: bytes both ways."""
        up = self.up
        assert up is not None
        self.up = None
        first_up = self.to_up + bytes(self.inbuf)
        self.inbuf.clear()
        events = READ if self.u_readable else 0  # what the last read left in the socket
        self.conn = SpliceConn(
            self.edges, self.owner.pool, self.sock, up, self.ended, events, first_up,
            self.to_guest + head + rest,
        )  # fmt: skip
        self.to_guest = self.to_up = b""

    def tunnel_request(self) -> bytes:
        assert self.tunnel_to is not None
        return connect_request(*self.tunnel_to)

    def tunnel_open(self, answer: TunnelAnswer) -> tuple[bytes, bytes]:
        """The proxy opened the tunnel: the guest reads its answer, as from its own proxy."""
        first_up = bytes(self.inbuf)
        self.inbuf.clear()
        return first_up, answer.head + answer.rest

    def tunnel_refused(self, answer: TunnelAnswer) -> None:
        """The proxy said no: the guest reads why, then the connection closes."""
        self.result = "proxy-refused"
        self._stop_waiting()
        self.to_guest += answer.head
        self.phase = CLOSING
        self._run()

    def expired(self) -> None:
        """The site's proxy did not answer a CONNECT in time."""
        self._stop_waiting()
        self.result = "proxy-timeout"
        self._answer(504, "Gateway Timeout", "the site's web proxy did not answer")

    # -- endings -------------------------------------------------------------------
    def refuse_now(self, r: Refusal, result: str | None = None) -> None:
        self.refused(r)
        if result is not None:
            self.result = result
        _status, page = http_refusal(r, self.wants_html)
        self._drop_upstream()
        self.to_guest += page
        self.phase = CLOSING
        self._run()

    def _fail(self, status: int, why: str) -> None:
        self.result = f"bad-request-{status}"
        self.reason = why
        self._answer(status, "Bad Request", why)

    def _answer(self, status: int, title: str, why: str) -> None:
        body = f"{why}\n".encode()
        self.to_guest += (
            f"HTTP/1.1 {status} {title}\r\nContent-Type: text/plain\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
            + body
        )
        self.phase = CLOSING
        self._run()

    def _close(self, result: str) -> None:
        if self.result == "ok":
            self.result = result
        self._drop_upstream()
        self._end_dialog()

    def abort(self, result: str) -> None:
        self._drop_upstream()
        if result in _CUT and self.conn is None:
            # a cut answer must not end like a whole one: a reset, not a FIN (a body that
            # ends with the connection would otherwise look complete)
            with contextlib.suppress(OSError):
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
        super().abort(result)
